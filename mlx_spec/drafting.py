"""Checking that a drafter fits its base model (before any token is drafted): MTP assistants read the base's
K/V, block drafters (DFlash, DSpark) its decoder layers' outputs; and finding a base's published drafter
for `--drafter auto`."""

from pathlib import Path
from typing import Optional

from .errors import HubUnreachableError, ModelLoadError, PairingError
from .families import LAYER_OUTPUTS, PRODUCER_KV, of_drafter
from .loading import is_hub_id, resolve_model_path
from .models.base import offers


def base_text_args(base):
    if not offers(base, PRODUCER_KV):
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


def validate_block_pairing(drafter, base) -> None:
    """The layers a block drafter reads must exist in the base (not its last: the final norm follows it),
    its width must be the base's (its fc reads len(ids) * H_base features) and so must its vocabulary."""
    family = of_drafter(drafter).name
    if not offers(base, LAYER_OUTPUTS):
        raise PairingError(f"a {family} block drafter reads a Gemma 4 base's decoder layers; this base is "
                           f"{getattr(base, 'model_type', type(base).__name__)}. Use --draft-model or --ngram with "
                           "other models")
    text, d = base.text_args, drafter.args

    def mismatch(what, drafter_value, base_value):
        raise PairingError(f"{family} drafter {what} is {drafter_value} but the base model's is {base_value}; "
                           "use the drafter made for this base")

    n = text.num_hidden_layers
    if d.num_target_layers is not None and d.num_target_layers != n:
        mismatch("num_target_layers", d.num_target_layers, f"num_hidden_layers {n}")
    try:
        base.check_layers(drafter.target_layer_ids)
    except ValueError:
        mismatch("target_layer_ids", drafter.target_layer_ids, f"range of readable layers [0, {n - 2}] (or -1)")
    if d.hidden_size != text.hidden_size:
        mismatch("hidden_size", d.hidden_size, text.hidden_size)
    if d.vocab_size != text.vocab_size:
        mismatch("vocab_size", d.vocab_size, text.vocab_size)
    if not 0 <= d.mask_token_id < text.vocab_size:
        mismatch("mask_token_id", d.mask_token_id, f"vocabulary [0, {text.vocab_size})")


QUANT_SUFFIXES = ("-4bit", "-8bit", "-bf16", "-fp16", "-mlx", "-qat", "-q4_0", "-6bit", "-3bit", "-5bit", "-mxfp4")


def auto_drafter_candidates(base_path: str) -> list:
    """Where Google's drafter for a base is likely to be, most specific first.

    A local directory `X` -> sibling `X-assistant`; a hub id `org/name` -> `org/name-assistant`, then
    Google's `google/<name without quantization suffixes>-assistant` (mlx-community bases are quantized
    copies of Google's repos, whose assistants Google publishes as `<base>-assistant`).
    """
    base_path = base_path.rstrip("/")
    out = [base_path + "-assistant"]
    name = base_path.split("/")[-1]
    stripped = name
    while stripped.lower().endswith(QUANT_SUFFIXES):
        stripped = stripped[: stripped.lower().rfind("-")]
    google = f"google/{stripped}-assistant"
    if google not in out and "/" in base_path and not Path(base_path).exists():
        out.append(google)
    return out


def find_auto_drafter(base_path: Optional[str]) -> str:
    """--drafter auto: the first candidate that exists locally or on the hub."""
    if not base_path:
        raise ModelLoadError("--drafter auto needs --model to be a hub repo id or a local directory")
    candidates = auto_drafter_candidates(base_path)
    for c in candidates:
        if Path(c).is_dir():
            return c
    for c in candidates:
        if is_hub_id(c):
            try:
                resolve_model_path(c)
                return c
            except HubUnreachableError:
                raise  # asking the next candidate would wait as long again
            except ModelLoadError:
                continue
    raise ModelLoadError(f"--drafter auto found no drafter for {base_path} (tried {', '.join(candidates)}); "
                         "pass --drafter PATH")
