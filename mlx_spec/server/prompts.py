"""A request's prompt as token ids, and how many tokens it may generate: rendered (the model's own chat
template), counted and bounded by the server's context before anything is generated.

A text that cannot fit the context whatever its tokens (longer than context x the longest token) is
refused without tokenizing it, so a huge prompt costs other clients milliseconds, not the tokenizer's
seconds.
"""

from typing import List, Optional

from ..api import encode_prompt
from ..models.base import vocab_size
from .requests import GenerationRequest, RequestError

NORMALIZATION_SLACK = 4  # input characters per token character at most (a tokenizer may compose characters)


class PromptReader:
    def __init__(self, model, tokenizer, max_context: Optional[int], max_tokens: int):
        self.tokenizer, self.max_context, self.max_tokens = tokenizer, max_context, max_tokens
        self.vocab_size = vocab_size(model)
        self.longest_token = _longest_token(tokenizer)

    def tokens(self, req: GenerationRequest) -> List[int]:
        tok = self.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "has_chat_template", False):
                raise RequestError("this model has no chat template; use /v1/completions with a raw prompt")
            try:  # the model's own template; the kwargs are the allowed switches only (requests.TEMPLATE_KWARGS)
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False,
                                               **req.chat_template_kwargs)
            except Exception as e:  # jinja raises TemplateError (and anything a template raises itself)
                raise RequestError(f"the chat template cannot render these messages: {e}", param="messages") from e
            return self._encode(text, "messages")
        if isinstance(req.prompt, str):
            return self._encode(req.prompt, "prompt")
        if self.vocab_size and not all(0 <= t < self.vocab_size for t in req.prompt):
            raise RequestError(f"'prompt' token ids must be in [0, {self.vocab_size})", param="prompt")
        return list(req.prompt)

    def _encode(self, text: str, param: str) -> List[int]:
        """Token ids of `text`; refused at once, untokenized, when no tokenization of it fits the context."""
        if self.max_context and self.longest_token:
            least = len(text) // (self.longest_token * NORMALIZATION_SLACK)  # no tokenization has fewer tokens
            if least >= self.max_context:
                raise RequestError(f"the prompt is {len(text)} characters, at least {least} tokens: more than this "
                                   f"server's context of {self.max_context} tokens (--max-context); shorten it",
                                   code="context_length_exceeded", param=param)
        return encode_prompt(self.tokenizer, text)

    def max_new_tokens(self, req: GenerationRequest, n_prompt: int) -> int:
        """The request's max_tokens (the server's default if unset), within what the context leaves."""
        if not self.max_context:
            return req.max_tokens or self.max_tokens
        room = self.max_context - n_prompt
        if room <= 0 or req.max_tokens is not None and req.max_tokens > room:
            asked = f" + {req.max_tokens} max_tokens" if req.max_tokens else ""
            raise RequestError(f"the prompt is {n_prompt} tokens{asked}, more than this server's context of "
                               f"{self.max_context} tokens (--max-context); shorten the prompt or lower max_tokens",
                               code="context_length_exceeded", param="messages" if req.kind == "chat" else "prompt")
        return min(req.max_tokens or self.max_tokens, room)


def _longest_token(tokenizer) -> Optional[int]:
    """Characters in the tokenizer's longest token (a token covers at most that much text, up to
    NORMALIZATION_SLACK), or None when the vocabulary cannot be read."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=None) or None
    except Exception:  # not every tokenizer has get_vocab; then prompts are only counted
        return None
