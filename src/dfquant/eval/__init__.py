"""Task evaluators: a float and a quantized model, compared on one task.

``evaluate(task, loaded, float_model, quant_model)`` returns ``{"task", "setup", "float", "quantized"}``.
Tasks: ``cifar10`` (top-1 on exact test images, agreement on a 10k JPEG copy), ``stsb`` (STS-B Spearman),
``wikitext2`` (perplexity, 32 windows of 1024 tokens), ``fidelity`` (data-free: synthetic inputs) and
``pairs`` (the shipped demo sentence pairs). Add one with :func:`register_evaluator`.
"""

from dfquant.eval import cifar10, fidelity, sts, wikitext2
from dfquant.eval.fidelity import fidelity_probe, synthetic_inputs
from dfquant.eval.metrics import agreement, pearson, relative_error, spearman, top1_accuracy
from dfquant.eval.registry import Progress, available_tasks, check_task, evaluate, register_evaluator
from dfquant.eval.sts import encode_sentences, load_demo_pairs, parse_pairs, parse_sts
from dfquant.eval.wikitext2 import lm_logits, perplexity, tokenize_text

__all__ = [
    "Progress",
    "agreement",
    "available_tasks",
    "check_task",
    "cifar10",
    "encode_sentences",
    "evaluate",
    "fidelity",
    "fidelity_probe",
    "lm_logits",
    "load_demo_pairs",
    "parse_pairs",
    "parse_sts",
    "pearson",
    "perplexity",
    "register_evaluator",
    "relative_error",
    "spearman",
    "sts",
    "synthetic_inputs",
    "tokenize_text",
    "top1_accuracy",
    "wikitext2",
]
