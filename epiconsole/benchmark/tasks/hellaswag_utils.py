"""HellaSwag document preprocessing for our task YAMLs: lm-eval's own, so our generative variant sees
exactly the text its loglikelihood task does."""

from lm_eval.tasks.hellaswag.utils import process_docs

__all__ = ["process_docs"]
