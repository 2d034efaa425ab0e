"""Loading an MTP drafter and checking that it fits its base model (before any token is drafted)."""

from pathlib import Path
from typing import Optional

from .errors import ModelLoadError, PairingError
from .loading import load_model


def base_text_args(base):
    if not hasattr(base, "producer_layers"):
        raise PairingError(
            f"an MTP drafter needs a Gemma 4 base model; this base is {getattr(base, 'model_type', type(base).__name__)}."
            " Use --draft-model or --ngram with other models"
        )
    return base.text_args


def validate_pairing(drafter, base) -> None:
    """Vocabulary, backbone width and the geometry of the K/V the drafter reads must match the base."""
    text = base_text_args(base)
    d = drafter.text_args

    def mismatch(what, drafter_value, base_value):
        raise PairingError(f"drafter {what} is {drafter_value} but the base model's is {base_value}; "
                           "use the assistant made for this base (e.g. <base>-assistant)")

    if d.vocab_size != text.vocab_size:
        mismatch("vocab_size", d.vocab_size, text.vocab_size)
    if drafter.args.backbone_hidden_size != text.hidden_size:
        mismatch("backbone_hidden_size", drafter.args.backbone_hidden_size, f"hidden_size {text.hidden_size}")
    producers = base.producer_layers
    for i, layer in enumerate(drafter.layers):
        t = layer.layer_type
        if t not in producers:
            mismatch(f"layer {i} type", t, f"producer layer types {sorted(producers)}")
        want = base.attention_geometry(t)
        got = (layer.self_attn.head_dim, layer.self_attn.n_kv_heads)
        if got != want:
            mismatch(f"{t} (head_dim, kv heads)", got, want)
        if d.num_attention_heads % want[1]:
            mismatch(f"num_attention_heads ({d.num_attention_heads}) for GQA over kv heads", d.num_attention_heads, want[1])


def find_auto_drafter(base_path: Optional[str]) -> str:
    """--drafter auto: Google publishes each base's drafter as `<base repo>-assistant`."""
    if not base_path:
        raise ModelLoadError("--drafter auto needs --model to be a hub repo id or a directory named after one")
    candidate = base_path.rstrip("/") + "-assistant"
    return candidate


def load_drafter(path_or_repo: str, base, base_path: Optional[str] = None, dtype: Optional[str] = None):
    """Load a `gemma4_assistant` drafter and validate it against `base`; raises PairingError on a mismatch."""
    if path_or_repo == "auto":
        path_or_repo = find_auto_drafter(base_path)
    drafter, config, model_dir = load_model(path_or_repo, dtype=dtype)
    if config.get("model_type") != "gemma4_assistant":
        raise PairingError(
            f"{Path(model_dir) / 'config.json'} is a {config.get('model_type')!r} model, not a gemma4_assistant "
            "drafter; for an ordinary small model use --draft-model"
        )
    validate_pairing(drafter, base)
    return drafter
