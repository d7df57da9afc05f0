"""Resolve the ``MODEL`` argument of the ``toprovar`` commands into a :class:`ModelAdapter`.

``MODEL`` is either a zoo name (``toprovar_fx.zoo.list_models()``) or ``module:factory``, a
function in an importable module (the current directory is searched first) that builds a
user's own model. The factory is called as ``factory(device=..., dtype=...)`` when it accepts
those keywords (``factory()`` otherwise) and returns one of

* a :class:`ModelAdapter` (full control), or
* ``(model, sampler_call)`` or ``(model, sampler_call, info)``, where
  ``sampler_call(fn, conditions, seed)`` calls ``fn`` (the model's sampler, eager or compiled,
  always ``model.autoregressive_infer_cfg`` unless ``info["sampler"]`` names another callable)
  for the list of ``conditions`` (class ids or prompt strings; its length is the batch size)
  and returns the images ``[B, 3, H, W]`` in ``[0, 1]`` or ``(images, logits_per_scale)``;
  ``info`` may set ``conditioning`` (``"class"`` or ``"prompt"``), ``default_condition``,
  ``num_classes``, ``timing_scope`` (what a timed call includes) and ``sampler``.

The zoo adapters call the samplers with ``return_logits=True`` and CFG on (VAR/HART
``cfg=1.5``, Infinity ``cfg_list=3.0``), and build calibration sets: evenly spaced class labels
for the class-conditional VAR/HART models, prompts from a file for Infinity (encoded with the
model's ``encode_prompts`` *before* any timing).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "Generation",
    "ModelAdapter",
    "ToolError",
    "check_model_spec",
    "load_model",
    "load_policy_arg",
    "parse_condition",
    "parse_dtype",
    "read_prompts",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ToolError(ValueError):
    """A bad argument of a ``toprovar`` command; the CLI prints it as a one-line error (exit 2)."""


@dataclass
class Generation:
    """One sampler call: images ``[B, 3, H, W]`` in ``[0, 1]`` and, when returned, per-scale logits."""

    images: torch.Tensor
    logits: list[torch.Tensor] | None = None


@dataclass
class ModelAdapter:
    """A model plus everything the tools need to call its sampler the same way every time.

    ``prepare(conditions)`` turns a list of conditions into sampler inputs (text encoding
    happens here, outside any timing); ``run(fn, prepared, seed)`` calls ``fn`` and returns what
    it returned. ``sampler`` is the callable that gets compiled.
    """

    name: str
    model: torch.nn.Module
    family: str  # var | hart | infinity | custom
    sampler: Callable[..., Any]
    prepare: Callable[[Sequence[Any]], Any]
    run: Callable[[Callable[..., Any], Any, int], Any]
    conditioning: str = "class"  # class | prompt
    default_condition: Any = 0
    num_classes: int | None = None
    timing_scope: str = "the sampler call as given by the factory"
    schedule: str | None = None  # the scale schedule generated (a key of scale_schedules)
    cfg_rows: int = 2  # transformer rows per image: classifier-free guidance doubles the batch
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- what the model says
    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """``model.fingerprint()`` when the model has one (zoo contract), else ``None``."""
        fp = getattr(self.model, "fingerprint", None)
        return dict(fp()) if callable(fp) else None

    @property
    def schedules(self) -> dict[str, list[tuple[int, int]]] | None:
        """``model.scale_schedules`` when present (name -> ``[(h, w), ...]``), else ``None``."""
        sched = getattr(self.model, "scale_schedules", None)
        if not sched:
            return None
        return {str(k): [(int(h), int(w)) for h, w in v] for k, v in sched.items()}

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def set_schedule(self, name: str | None) -> None:
        """Generate ``name`` (a key of the model's ``scale_schedules``); ``None`` keeps the default."""
        if name is None:
            return
        known = self.schedules
        if known is None:
            raise ToolError(f"model {self.name!r} lists no scale_schedules; --resolution cannot be chosen")
        if name not in known:
            raise ToolError(f"--resolution {name!r} is not a schedule of {self.name}; valid: {', '.join(known)}")
        if self.family in ("var", "hart") and name != self.schedule:
            raise ToolError(f"{self.name} generates only {self.schedule!r}")
        self.schedule = name

    # ---------------------------------------------------------------- calling the sampler
    def generate(self, fn: Callable[..., Any], prepared: Any, seed: int) -> Generation:
        """Call ``fn`` (eager or compiled sampler) on prepared conditions with ``seed``."""
        out = self.run(fn, prepared, seed)
        if isinstance(out, tuple):
            images, logits = out[0], (list(out[1]) if len(out) > 1 and out[1] is not None else None)
        else:
            images, logits = out, None
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise RuntimeError(f"the sampler of {self.name} returned {type(images).__name__}, "
                               "expected images [B, 3, H, W] (or (images, logits))")
        return Generation(images, logits)

    def conditions(self, condition: Any | None, batch: int) -> list[Any]:
        """``batch`` copies of ``condition`` (default: the adapter's default), checked for its kind."""
        cond = self.default_condition if condition is None else condition
        if self.conditioning == "class":
            if not isinstance(cond, int):
                raise ToolError(f"{self.name} is class-conditional: the condition must be a class id, got {cond!r}")
            if self.num_classes is not None and not 0 <= cond < self.num_classes:
                raise ToolError(f"class {cond} is out of range for {self.name} (0..{self.num_classes - 1})")
        elif self.conditioning == "prompt":
            cond = str(cond)
        return [cond] * batch

    def calibration_set(self, *, classes: int | None = None, prompts: Sequence[str] | None = None) -> list[Any]:
        """Calibration conditions: ``classes`` evenly spaced labels or the given ``prompts``."""
        if prompts is not None and classes is not None:
            raise ToolError("give either --classes or --prompts, not both")
        if self.conditioning == "class":
            if prompts is not None:
                raise ToolError(f"{self.name} is class-conditional: use --classes N, not --prompts")
            n = 16 if classes is None else classes
            if n < 1:
                raise ToolError("--classes must be >= 1")
            total = self.num_classes or n
            return [int(i * total / n) % total for i in range(n)] if n <= total else [i % total for i in range(n)]
        if classes is not None:
            raise ToolError(f"{self.name} is text-conditional: use --prompts FILE (one prompt per line)")
        items = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        if not items:
            raise ToolError("the prompts file holds no prompt")
        return items


DEFAULT_PROMPTS = (
    "a red cat sitting on a mat",
    "a lighthouse on a rocky coast at dusk",
    "two blue squares on white paper",
    "a bowl of ripe oranges on a table",
    "a snowy mountain under a clear sky",
    "a city street in the rain at night",
    "an old wooden boat on a calm lake",
    "a portrait of a smiling woman in a hat",
)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ToolError(f"prompts file {str(p)!r} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ToolError(f"prompts file {str(p)!r} holds no prompt")
    return prompts


def parse_dtype(name: str) -> torch.dtype:
    """``float32 | bfloat16 | float16`` (or fp32 / bf16 / fp16) -> ``torch.dtype``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ToolError(f"unknown dtype {name!r}; valid: float32, bfloat16, float16") from None


def parse_condition(text: str | None) -> int | str | None:
    """A ``--condition`` value: an int is a class id, anything else a prompt."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def load_policy_arg(spec: str, preset: str | None = None) -> Any:
    """A ``--policy`` value: a shipped name, ``NAME:PRESET``, or a YAML path (``PATH.yaml:PRESET``
    too); ``preset`` (``--preset``) applies when the spec names none. Raises ``PolicyError``."""
    from toprovar_fx.policies import list_policies, load_policy

    name, pre = spec, None
    if not spec.endswith((".yaml", ".yml")) and ":" in spec:
        base, _, tail = spec.rpartition(":")
        if base in list_policies() or base.endswith((".yaml", ".yml")):
            name, pre = base, tail
    if pre is not None and preset is not None and pre != preset:
        raise ToolError(f"policy {spec!r} names preset {pre!r} but --preset is {preset!r}")
    return load_policy(name, preset=pre if pre is not None else preset)


def check_model_spec(spec: str) -> None:
    """Validate ``MODEL`` without building anything: a zoo name, or an importable ``module:factory``."""
    from toprovar_fx import zoo

    if spec in zoo.list_models():
        return
    if ":" not in spec:
        raise ToolError(f"unknown model {spec!r}; valid zoo names: {', '.join(zoo.list_models())} "
                        "(or module:factory for your own model)")
    _factory(spec)


def _factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ToolError(f"bad model {spec!r}; expected a zoo name or module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # the console script does not put the working directory on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ToolError(f"cannot import module {module_name!r} of model {spec!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ToolError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
    if not callable(fn):
        raise ToolError(f"{spec!r} is not callable")
    return fn  # type: ignore[return-value]


def load_model(spec: str | ModelAdapter, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> ModelAdapter:
    """Build ``spec`` (zoo name or ``module:factory``) on ``device`` / ``dtype``; an adapter passes through.

    Zoo models load their shipped trained checkpoint when the registry has one, else they are
    built with deterministic random weights from ``seed``. ``device="meta"`` builds shapes only.
    """
    if isinstance(spec, ModelAdapter):
        return spec
    check_model_spec(spec)
    from toprovar_fx import zoo

    if spec in zoo.list_models():
        return _zoo_adapter(spec, device=device, dtype=dtype, seed=seed)
    return _custom_adapter(spec, _factory(spec), device=device, dtype=dtype)


def _zoo_adapter(name: str, *, device: str | torch.device, dtype: torch.dtype, seed: int) -> ModelAdapter:
    from toprovar_fx import zoo

    card = zoo.model_card(name)
    pretrained = torch.device(device).type != "meta" and bool(card.get("pretrained"))
    model = zoo.build(name, pretrained=pretrained, seed=seed, device=device, dtype=dtype)
    family = card["family"]
    schedule = model.cfg.default_schedule if family == "infinity" else next(iter(model.scale_schedules))
    if family == "infinity":
        holder: list[ModelAdapter] = []

        def run_infinity(fn: Callable[..., Any], cond: Any, seed_: int) -> Any:
            return fn(cond, B=len(cond[1]), scale_schedule=holder[0].schedule, g_seed=seed_, cfg_list=3.0,
                      return_logits=True)

        holder.append(ModelAdapter(
            name=name, model=model, family=family, sampler=model.autoregressive_infer_cfg,
            prepare=lambda conds: model.encode_prompts([str(c) for c in conds]),
            run=run_infinity, conditioning="prompt", default_condition=DEFAULT_PROMPTS[0],
            timing_scope=("transformer at every scale (CFG: 2 rows per image), bit sampling, residual "
                          "accumulation, VAE decode; NOT the text encoder (prompts are encoded once "
                          "before timing)"),
            schedule=schedule, extra={"pretrained": pretrained},
        ))
        return holder[0]

    def prepare_labels(conds: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([int(c) for c in conds], device=model.device)

    def run_var(fn: Callable[..., Any], labels: torch.Tensor, seed_: int) -> Any:
        return fn(B=int(labels.shape[0]), label_B=labels, g_seed=seed_, cfg=1.5, return_logits=True)

    scope = "class embedding, transformer at every scale (CFG: 2 rows per image), token sampling, "
    scope += "residual diffusion MLP, " if family == "hart" else ""
    scope += "VQ-VAE decode; no text encoder (class-conditional)"
    return ModelAdapter(
        name=name, model=model, family=family, sampler=model.autoregressive_infer_cfg,
        prepare=prepare_labels, run=run_var, conditioning="class", default_condition=3,
        num_classes=int(model.num_classes), timing_scope=scope, schedule=schedule,
        extra={"pretrained": pretrained},
    )


def _custom_adapter(spec: str, factory: Callable[..., Any], *, device: str | torch.device,
                    dtype: torch.dtype) -> ModelAdapter:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if takes_kw or k in params}
    if torch.device(device).type == "meta" and "device" not in kwargs:
        raise ToolError(f"factory {spec!r} takes no device argument; cannot build it without weights")
    built = factory(**kwargs)
    if isinstance(built, ModelAdapter):
        return built
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise ToolError(f"factory {spec!r} returned {type(built).__name__}; expected a ModelAdapter, "
                        "(model, sampler_call) or (model, sampler_call, info)")
    model, call = built[0], built[1]
    info = dict(built[2]) if len(built) == 3 else {}
    if not isinstance(model, torch.nn.Module) or not callable(call):
        raise ToolError(f"factory {spec!r} must return (torch.nn.Module, callable sampler_call[, info])")
    if "device" not in kwargs:
        model = model.to(device=device, dtype=dtype)
    sampler = info.get("sampler") or getattr(model, "autoregressive_infer_cfg", None)
    if sampler is None:
        raise ToolError(f"model of {spec!r} has no autoregressive_infer_cfg; pass info={{'sampler': fn}}")
    conditioning = info.get("conditioning", "class")
    if conditioning not in ("class", "prompt"):
        raise ToolError(f"factory {spec!r}: info['conditioning'] must be 'class' or 'prompt'")
    sched = getattr(model, "scale_schedules", None)
    return ModelAdapter(
        name=spec, model=model, family=str(info.get("family", "custom")), sampler=sampler,
        prepare=lambda conds: list(conds), run=lambda fn, conds, seed: call(fn, conds, seed),
        conditioning=conditioning,
        default_condition=info.get("default_condition", 0 if conditioning == "class" else DEFAULT_PROMPTS[0]),
        num_classes=info.get("num_classes", getattr(model, "num_classes", None)),
        timing_scope=str(info.get("timing_scope", "the factory's sampler_call (see its documentation)")),
        schedule=info.get("schedule", next(iter(sched)) if sched else None),
    )
