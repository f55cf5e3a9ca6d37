#!/bin/sh
# Make sure a headless Chromium is available for the HTML report test (tests/integration/test_report_html.py).
# Idempotent: does nothing when chromium is already installed. Installs Debian's `chromium` package with apt-get
# when it is missing; never fails the setup (it prints why it could not install instead), so the test itself
# reports the missing browser with a clear message.
set -u
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "ensure_chromium: $(command -v "$name") present"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: chromium is missing and apt-get is not available; install a Chromium browser by hand" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: chromium is missing and installing it needs root (run: apt-get install -y chromium)" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing Debian's chromium package"
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 \
         && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; then
    echo "ensure_chromium: installed $(command -v chromium)"
else
    echo "ensure_chromium: apt-get could not install chromium (no network or no package list?)" >&2
fi
exit 0
