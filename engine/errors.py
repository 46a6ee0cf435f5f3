class InferError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class ParameterError(InferError):
    """An engine parameter (a SamplingParams field, max_context, device, ...) with a value it cannot take. The
    engine names its own parameter; each front end names it in its own words (a CLI flag, a request field), also
    the other parameters the problem refers to, written {name} in it."""

    def __init__(self, name: str, problem: str, refers: tuple[str, ...] = ()):
        self.name, self.problem, self.refers = name, problem, refers
        super().__init__(f"{name} {self.described(lambda other: other)}")

    def described(self, call) -> str:
        """The problem with each parameter it refers to named by call(parameter)."""
        text = self.problem
        for other in self.refers:
            text = text.replace("{" + other + "}", call(other))
        return text


class ContextOverflow(InferError):
    """An input of `tokens` tokens that the KV cache, `limit` tokens (the model's own context: `model_limit`),
    cannot hold with room for an answer."""

    def __init__(self, tokens: int, limit: int, model_limit: int):
        self.tokens, self.limit, self.model_limit = tokens, limit, model_limit
        super().__init__(f"the input has {tokens} tokens; the context holds {limit}")
