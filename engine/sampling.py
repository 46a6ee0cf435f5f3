"""Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import read_json_object
from .errors import InferError, ParameterError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings, besides the EOS ids

    def __post_init__(self):
        check_sampling(vars(self))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each sampling value must be: (test, what the error says). The one place these rules live: flags, request
# fields and generation_config.json are all checked with them.
SAMPLING_RULES = {
    "temperature": (lambda v: _number(v) and v >= 0, "must be a number >= 0 (0 is greedy)"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0 (0 is off)"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "must be a number in [0, 1]"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "must be a number > 0 (1 is off)"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63, "must be an integer >= 0"),
    "max_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
    "stop": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
             "must be a list of non-empty strings"),
}


def check_sampling(values: dict) -> None:
    """Raise ParameterError for the first value of `values` (SamplingParams field names; None means unset) that
    SAMPLING_RULES refuses."""
    for name, value in values.items():
        test, rule = SAMPLING_RULES[name]
        if value is not None and not test(value):
            raise ParameterError(name, f"{rule}, got {value!r}")


def generation_defaults(path: Path) -> dict:
    """Sampling defaults from a model's generation_config.json, under SamplingParams' names; a value of the wrong
    kind is an InferError naming the file and the field."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    raw = read_json_object(file)
    defaults = {k: v for k, v in raw.items() if k in SAMPLING_RULES and k not in ("stop", "seed") and v is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    try:
        check_sampling(defaults)
    except ParameterError as e:
        raise InferError(f"{file}: {e}") from None
    return defaults


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; history [N] token ids seen so far. Same rule as Hugging Face (divide positive, multiply negative)."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(0, history)
    logits = logits.clone()
    logits.scatter_(0, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from at temperature > 0 after top-k, top-p and min-p filtering: logits [V] -> probs [V]."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the strictly more likely tokens
        drop = torch.zeros_like(probs).scatter_(0, order, (before >= params.top_p).float()).bool()
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def sample(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The next token as a tensor [1] on logits' device (no host sync): logits [V] float32 for the next
        position; history [N] ids the penalty applies to."""
        logits = apply_repetition_penalty(logits, history, self.params.repetition_penalty)
        if self.params.greedy:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(probabilities(logits, self.params), 1, generator=self.generator)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """`sample` as a host int."""
        return int(self.sample(logits, history))
