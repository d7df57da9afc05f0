"""The trained reference model ``var-ref``: training forward, checkpoint shards, loader.

* ``teacher_forced_logits``: VAR's training forward for a ``VARStyle`` (which has only the
  sampler): every scale at once, each token attending to its own scale and the earlier ones
  (``block_causal_bias``). It is written with the model's own submodules and the same
  arithmetic as ``AdaLNSelfAttnBlock.forward`` / ``CachedSelfAttention.forward``, so logits
  equal the sampler's for the same token maps (tested).
* ``training_init_``: VAR's initialisation for training (small embeddings, head x 0.02,
  output projections / sqrt(2 depth), AdaLN gains ~0), not the zoo's "everything matters"
  random init.
* ``save_reference`` / ``load_reference`` / ``load_reference_tokenizer``: a directory with
  ``config.json`` and fp16 safetensors shards (``model-0000i-of-0000n.safetensors``, each at
  most ``max_shard_bytes``) plus ``model.safetensors.index.json`` (the Hugging Face layout:
  ``weight_map`` key -> shard). Transformer keys are ``VARStyle.state_dict()`` keys (including
  ``vae.*``, the decoder side of the tokenizer); the tokenizer's encoder side is stored under
  ``tokenizer.encoder.*`` / ``tokenizer.quant_conv.*``. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import check_state_dict
from .common import CachedSelfAttention, modulate
from .ref_tokenizer import RefTokenizer, TokenizerConfig
from .var import AdaLNSelfAttnBlock, VARConfig, VARStyle

FORMAT = "toprovar-var-ref/1"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_PREFIX = "tokenizer."
# tensor payload per shard; with the JSON header every file stays below 16 MB (16e6 bytes)
MAX_SHARD_BYTES = 15_500_000


# --------------------------------------------------------------------------- training forward
def block_causal_bias(
    patch_nums: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive attention bias ``[1, 1, L, L]``: 0 where token ``i``'s scale >= token ``j``'s, else -inf.

    The storage is padded to a multiple of 8 columns (then sliced) so memory-efficient SDPA
    kernels accept it.
    """
    lens = [p * p for p in patch_nums]
    total = sum(lens)
    lvl = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    allowed = lvl[:, None] >= lvl[None, :]
    padded = -(-total // 8) * 8
    bias = torch.full((total, padded), float("-inf"), dtype=dtype)
    bias[:, :total].masked_fill_(allowed, 0.0)
    return bias.to(device)[None, None, :, :total]


def _attn_masked(attn: CachedSelfAttention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``CachedSelfAttention.forward`` without the cache and with an additive mask."""
    n, length, _ = x.shape
    qkv = attn.qkv(x).view(n, length, 3, attn.heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if attn.qk_norm:
        q = F.normalize(q, dim=-1) * attn.log_scale.clamp(max=attn.MAX_LOG_SCALE).exp()
        k = F.normalize(k, dim=-1)
    # under autocast the normalisation may promote q, k to fp32 while v stays bf16: one dtype for SDPA
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(v.dtype), scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(n, length, attn.width))


def _block_masked(blk: AdaLNSelfAttnBlock, x: torch.Tensor, cond: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (blk.ada_gss + cond).unbind(2)
    x = x + _attn_masked(blk.attn, modulate(blk.norm(x), scale1, shift1), bias) * gamma1
    return x + blk.ffn_branch(x, scale2, shift2, gamma2)


def teacher_forced_logits(
    model: VARStyle, labels: torch.Tensor, x_BLCv: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Logits ``[B, L, V]`` of every scale at once (VAR's training ``forward``).

    ``labels``: class ids ``[B]`` (``num_classes`` is the null class); ``x_BLCv``: teacher-forcing
    inputs ``[B, L - p_0^2, Cvae]`` (``RefTokenizer.idx_to_var_input``); ``bias``:
    ``block_causal_bias(model.patch_nums)``. Row ``b`` of the result equals the conditional
    logits the sampler computes when it is fed the same token maps (no CFG).
    """
    b = labels.shape[0]
    sos = cond = model.class_emb(labels)
    cond_gss = model.shared_ada_lin(cond)
    first = sos.unsqueeze(1).expand(b, model.first_l, -1) + model.pos_start.expand(b, model.first_l, -1)
    x = torch.cat((first, model.word_embed(x_BLCv.to(first.dtype))), dim=1) + model.level_pos_all()
    for blk in model.blocks:
        x = _block_masked(blk, x, cond_gss, bias)
    return model.head(model.head_nm(x, cond))


@torch.no_grad()
def training_init_(model: VARStyle, gen: torch.Generator, init_head: float = 0.02, init_adaln: float = 0.5,
                   init_adaln_gamma: float = 1e-5, attn_temperature: float = 4.0) -> None:
    """VAR's training initialisation of the transformer (``model.vae`` is left untouched).

    Linear and embedding weights ``N(0, 1/(3C))`` (truncated at 2 std), zero biases; the head
    times ``init_head``; attention/FFN output projections divided by ``sqrt(2 depth)``; per-block
    AdaLN gains ``ada_gss ~ N(0, 1/C)`` with the scale/shift parts times ``init_adaln`` and the
    gamma parts times ``init_adaln_gamma`` (blocks start close to the identity); qk-norm
    temperature ``attn_temperature``.
    """
    c = model.width
    std = math.sqrt(1 / c / 3)

    def tn(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen).clamp_(-2, 2).mul_(s))

    for name, m in model.named_modules():
        if name.startswith("vae"):
            continue
        if isinstance(m, nn.Linear):
            tn(m.weight, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            tn(m.weight, std)
    tn(model.pos_start, std)
    tn(model.pos_1LC, std)
    model.head.weight.mul_(init_head)
    model.head_nm.ada_lin.weight.mul_(init_adaln)
    for blk in model.blocks:
        blk.attn.proj.weight.div_(math.sqrt(2 * model.depth))
        blk.ffn.fc2.weight.div_(math.sqrt(2 * model.depth))
        tn(blk.ada_gss, 1 / math.sqrt(c))
        blk.ada_gss[:, :, 2:].mul_(init_adaln)
        blk.ada_gss[:, :, :2].mul_(init_adaln_gamma)
        if blk.attn.log_scale is not None:
            blk.attn.log_scale.fill_(math.log(attn_temperature))


# --------------------------------------------------------------------------- checkpoint
def _shard(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        t = state[k]
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"tensor {k} ({nbytes} bytes) exceeds the shard limit {max_bytes}")
        if size + nbytes > max_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def reference_state(model: VARStyle, tokenizer: RefTokenizer | None, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors a reference checkpoint holds (``VARStyle`` keys + ``tokenizer.*`` encoder keys)."""
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if tokenizer is not None:
        for k, v in tokenizer.state_dict().items():
            if not k.startswith("vae."):
                state[TOKENIZER_PREFIX + k] = v.detach().to("cpu", dtype).contiguous()
    return state


def save_reference(
    model: VARStyle,
    tokenizer: RefTokenizer | None,
    out_dir: str | os.PathLike,
    extra_config: Mapping | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json``, the index and fp16 shards to ``out_dir``; returns the file names.

    ``tokenizer.vae`` must be ``model.vae``'s weights (the transformer checkpoint carries them once).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = reference_state(model, tokenizer, dtype)
    shards = _shard(state, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": FORMAT, "fingerprint": json.dumps(model.fingerprint(), sort_keys=True)}
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        os.chmod(os.path.join(out_dir, name), 0o644)  # safetensors creates 0600 files
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": total, "format": FORMAT}, "weight_map": weight_map}, fh, indent=1, sort_keys=True)
    config = {
        "format": FORMAT,
        "var": model.cfg.to_dict(),
        "tokenizer": tokenizer.cfg.to_dict() if tokenizer is not None else None,
        "fingerprint": model.fingerprint(),
        "dtype": str(dtype).removeprefix("torch."),
        "shards": names,
        **dict(extra_config or {}),
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as fh:
        json.dump(config, fh, indent=1)
    return [CONFIG_FILE, INDEX_FILE, *names]


def _dir_of(path_or_dir: str | os.PathLike) -> str:
    p = os.fspath(path_or_dir)
    return os.path.dirname(p) if os.path.isfile(p) else p


def read_reference_config(path_or_dir: str | os.PathLike) -> dict:
    """``config.json`` of a reference checkpoint directory (or of the directory of a file in it)."""
    with open(os.path.join(_dir_of(path_or_dir), CONFIG_FILE)) as fh:
        cfg = json.load(fh)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path_or_dir}: not a {FORMAT} checkpoint (format {cfg.get('format')!r})")
    return cfg


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def var_config_of(cfg: dict) -> VARConfig:
    """The ``VARConfig`` stored in a reference ``config.json``."""
    return VARConfig(**_tuples(cfg["var"]))


def read_reference_state(path_or_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a reference checkpoint (all shards), as stored (fp16), on CPU."""
    d = _dir_of(path_or_dir)
    cfg = read_reference_config(d)
    state: dict[str, torch.Tensor] = {}
    for name in cfg["shards"]:
        with safe_open(os.path.join(d, name), framework="pt", device="cpu") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[k] = fh.get_tensor(k)
    return state


def load_into(model: VARStyle, path_or_dir: str | os.PathLike) -> VARStyle:
    """Load a reference checkpoint's transformer weights into an existing ``model`` (strict keys
    and shapes; ``tokenizer.*`` keys are ignored); a ``meta`` model gets CPU tensors assigned.
    Tensors are converted to fp32 (then to the dtype of the parameter they replace)."""
    state = {k: v.float() for k, v in read_reference_state(path_or_dir).items() if not k.startswith(TOKENIZER_PREFIX)}
    check_state_dict(model, state, source=os.fspath(path_or_dir))
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def load_reference(
    path_or_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> VARStyle:
    """Build the ``VARStyle`` of a reference checkpoint (strict key/shape check), eval mode."""
    with torch.device("meta"):
        model = VARStyle(var_config_of(read_reference_config(path_or_dir)))
    return load_into(model, path_or_dir).to(device=device, dtype=dtype).eval()


def load_reference_tokenizer(
    path_or_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RefTokenizer:
    """Build the ``RefTokenizer`` (encoder + the ``vae.*`` decoder side) of a reference checkpoint."""
    cfg = read_reference_config(path_or_dir)
    if not cfg.get("tokenizer"):
        raise ValueError(f"{path_or_dir}: the checkpoint has no tokenizer encoder")
    full = read_reference_state(path_or_dir)
    state = {k[len(TOKENIZER_PREFIX):]: v for k, v in full.items() if k.startswith(TOKENIZER_PREFIX)}
    state.update({k: v for k, v in full.items() if k.startswith("vae.")})
    with torch.device("meta"):
        tok = RefTokenizer(TokenizerConfig(**_tuples(cfg["tokenizer"])))
    check_state_dict(tok, state, source=os.fspath(path_or_dir))
    tok.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    tok.usage = torch.zeros(tok.cfg.vocab_size)
    return tok.to(device=device, dtype=dtype).eval()


__all__ = [
    "block_causal_bias",
    "load_into",
    "load_reference",
    "load_reference_tokenizer",
    "read_reference_config",
    "read_reference_state",
    "save_reference",
    "teacher_forced_logits",
    "training_init_",
    "var_config_of",
]
