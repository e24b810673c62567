"""Tiny, randomly initialised LeRobot pi0 / pi05 / SmolVLA checkpoints, built fully offline.

Pure helpers (no pytest fixtures, nothing happens at import) for tests and benchmarks:

- :func:`build_tokenizer` writes a ``tokenizers`` WordLevel tokenizer wrapped in transformers'
  ``PreTrainedTokenizerFast`` (vocab :data:`TINY_VOCAB_SIZE` = 512: specials, the 256 state-bin numbers
  pi05 writes into its prompt, Meta-World task words, punctuation, unused fillers; ``<unk>`` for the rest).
  It carries the SmolVLM special tokens (``fake_image_token_id`` / ``global_image_token_id`` ...) so the
  same tokenizer serves pi0, pi05 and SmolVLA.
- :func:`make_tiny_vla_checkpoint` builds ``PI0Policy`` / ``PI05Policy`` / ``SmolVLAPolicy`` with LeRobot's
  own classes and configs, and writes a real checkpoint directory::

      directory/
        config.json  model.safetensors              (policy.save_pretrained)
        policy_preprocessor.json  policy_postprocessor.json  *.safetensors (normaliser stats)
        tokenizer/                                   (build_tokenizer; pi0 / pi05 processors point here)
        vlm/                                         (SmolVLA only: tiny SmolVLMConfig + SmolVLMProcessor;
                                                      config.vlm_model_name and its processor point here)

  The processors are LeRobot's ``make_pre_post_processors`` output with the given (or synthetic) dataset
  stats (mean / std / min / max / q01 / q10 / q50 / q90 / q99 / count), and their JSON names the LOCAL
  (absolute) tokenizer path, so ``PolicyProcessorPipeline.from_pretrained(directory, ...)`` and
  ``make_pre_post_processors(cfg, pretrained_path=directory)`` reload offline.  The paths are absolute:
  moving the directory breaks them (pass ``preprocessor_overrides={"tokenizer_processor":
  {"tokenizer_name": new_path}}`` then, and for SmolVLA override ``vlm_model_name``).

How the tiny sizes survive a reload (the approach, and why)
----------------------------------------------------------
SmolVLA needs NO patch: its sizes come from ``AutoConfig.from_pretrained(config.vlm_model_name)``, which is
the local ``directory/"vlm"`` folder.  ``load_vlm_weights=False`` is saved, so a reload builds the VLM from
that config (random init) and then ``PreTrainedPolicy.from_pretrained`` loads every weight (VLM included, in
float32) from ``model.safetensors``: the same weights, bit for bit.  (With ``load_vlm_weights=True`` LeRobot
would load the VLM in bfloat16 from the folder first; not used here.)

pi0 / pi05 CANNOT be rebuilt tiny from the checkpoint alone: ``PI0Pytorch.__init__`` takes its widths from
``get_gemma_config(variant)`` and the variant is validated to be "gemma_300m" or "gemma_2b"
(``configuration_pi0.py`` l.114-118), and ``PaliGemmaWithExpertModel.__init__`` hard-codes vocab 257152
and the SigLIP-So400m vision sizes (``modeling_pi0.py`` l.205-245; ``modeling_pi05.py`` l.202-242).
Without a patch a reload would build the full 3B-parameter model (about 12 GB in float32) and its
``from_pretrained`` would then print "Could not load state dict" and return it RANDOM (see the traps below).
So a patch is needed at reload too, and it is made SAFE to leave installed for the whole process: it
reads a marker from the policy config itself.  Tiny checkpoints carry ``config.tags == [TINY_VLA_TAG]``
(``tags`` is an ordinary ``PreTrainedConfig`` field, saved in config.json); only configs with that tag are
affected, real user checkpoints (``lerobot/pi0_base`` ...) build exactly as before.

What the patch touches (``install_tiny_vla_sizes()`` permanently, ``tiny_vla_sizes()`` for a ``with`` block):

- ``lerobot.policies.pi0.modeling_pi0.PI0Pytorch.__init__`` and
  ``lerobot.policies.pi05.modeling_pi05.PI05Pytorch.__init__`` are wrapped.  For a config WITH the tag,
  during that one ``__init__`` call only, these module globals of the same module are swapped (under a lock)
  and then restored: ``get_gemma_config`` (tiny widths), ``PaliGemmaForConditionalGenerationWithPiGemma``
  and ``PiGemmaForCausalLM`` (factories that shrink the HF config - vocab, SigLIP sizes, projection width -
  then build the real class, so module types and state-dict keys are unchanged).  For any other config the
  original ``__init__`` runs untouched.

The caller must therefore call ``install_tiny_vla_sizes()`` (or wrap the load in ``tiny_vla_sizes()``)
before ``PI0Policy.from_pretrained(directory)`` / ``PI05Policy.from_pretrained(directory)`` / ``make_policy``
in a fresh process.  Nothing else global is set: no environment variables, no torch defaults.

Traps seen in LeRobot 0.6.1 (site-packages/lerobot/...):

- ``policies/pi0/modeling_pi0.py`` ``PI0Policy.from_pretrained`` (l.782; pi05 l.747): if
  ``model.safetensors`` cannot be resolved it prints "Returning model without loading pretrained weights"
  (l.846-848; pi05 l.811-813), and ANY exception in the load (e.g. a size mismatch under ``strict=True``)
  is caught and printed as "Warning: Could not load state dict" (l.895; pi05 l.860); in both cases it
  returns the random model.  Use :func:`assert_same_weights` after a reload.
- ``predict_action_chunk(batch, noise=...)``: SmolVLA names ``noise`` in its signature; pi0 / pi05 take it
  through ``**kwargs`` (typed ``ActionSelectKwargs``, which lacks it) and pass it to ``sample_actions``.
  Its shape is (B, chunk_size, max_action_dim) - the PADDED action width (32 here), not action_dim.
- The pi0 / pi05 processor factories (``policies/pi0/processor_pi0.py`` l.141, ``pi05/processor_pi05.py``
  l.141) hard-code ``TokenizerProcessorStep(tokenizer_name="google/paligemma-3b-pt-224")``, loaded at
  construction: gated on the Hub, so they cannot run offline.  Here the factory runs with that module's
  ``TokenizerProcessorStep`` name temporarily bound to a function forcing ``tokenizer_name`` to the local
  path (so the saved JSON names that path; a step built with ``tokenizer=<object>`` saves no name at all,
  ``processor/tokenizer_processor.py`` l.291).
- ``max_state_dim`` defaults to 32 and ``pad_vector`` never truncates: a 39-dim state would hit
  ``state_proj`` (Linear(32, ...)) with 39 features.  Configs here use ``max_state_dim = max(32, state_dim)``.
- pi05 normalises STATE and ACTION with QUANTILES (q01 / q99); a key with stats but no quantiles raises,
  a key with NO stats passes through unnormalised, silently (``processor/normalize_processor.py`` l.330).
- 8 attention heads are required: ``modeling_pi0.py`` l.124 reshapes the attention output to ``8 * head_dim``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_VLA_TAG",
    "TINY_VOCAB_SIZE",
    "KINDS",
    "build_tokenizer",
    "make_tiny_vla_checkpoint",
    "make_tiny_vla_config",
    "synthetic_dataset_stats",
    "tiny_vla_sizes",
    "install_tiny_vla_sizes",
    "is_tiny_vla_config",
    "policy_class",
    "load_tiny_vla_policy",
    "assert_same_weights",
]

KINDS = ("pi0", "pi05", "smolvla")

#: Marker stored in ``config.tags`` of every tiny pi0 / pi05 checkpoint; the size patch acts only on it.
TINY_VLA_TAG = "lerobot-ript-tiny-vla-v1"

TINY_VOCAB_SIZE = 512

# pi0 / pi05 sizes (8 heads are required: modeling_pi0.compute_layer_complete reshapes to 8 * head_dim;
# the VLM and the expert need equal depth, head_dim and KV heads).
_PI_GEMMA_SIZES = {
    # variant: (width, depth, mlp_dim, num_heads, num_kv_heads, head_dim)
    "gemma_2b": (64, 2, 128, 8, 1, 8),  # the PaliGemma language model
    "gemma_300m": (48, 2, 96, 8, 1, 8),  # the action expert
}
_PI_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "patch_size": 8,
}

# SmolVLM (SmolVLA backbone) sizes.
_SMOLVLM_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}
_SMOLVLM_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "patch_size": 8,
}
_SMOLVLM_SCALE_FACTOR = 2

# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

_PAD, _UNK, _BOS, _EOS = "<pad>", "<unk>", "<bos>", "<eos>"
_SMOLVLM_SPECIALS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    "video_token": "<video>",
}
_WORDS = """
task state action subtask push pull pick place reach open close press turn lift put move slide grasp
insert hang sweep hammer stick drag rotate unplug plug shelf into onto off on in at to from the a an of
with and or then puck block cube ball peg hole box lid drawer door window button faucet handle lever
coffee mug cup plate bin basket basketball hoop soccer goal nut wrench dial disassemble assemble
assembly stack stacked wall top side front back left right up down over under near far red green blue
yellow black white small large big tiny robot arm gripper object target position table corner camera
first second third this that it its is are be go get make do please now until done success fail
""".split()
_PUNCT = list(".,;:!?'\"-_()[]{}/\\+*=<>#%&|~`@$^")


def _vocabulary(size: int = TINY_VOCAB_SIZE) -> list[str]:
    tokens = [_PAD, _UNK, _BOS, _EOS, *_SMOLVLM_SPECIALS.values()]
    tokens += [str(i) for i in range(256)]  # pi05 writes the state as 256-bin integers into the prompt
    tokens += [w for w in dict.fromkeys(_WORDS) if w not in tokens]
    tokens += [p for p in _PUNCT if p not in tokens]
    if len(tokens) > size:
        raise ValueError(f"vocabulary needs {len(tokens)} entries, more than {size}")
    tokens += [f"<unused_{i}>" for i in range(size - len(tokens))]
    return tokens


def _token_id(token: str) -> int:
    return _vocabulary().index(token)


def build_tokenizer(directory: Path) -> Path:
    """Write a small WordLevel ``PreTrainedTokenizerFast`` to ``directory`` and return ``directory``.

    Lower-cases, splits on whitespace and punctuation, prepends ``<bos>``; pad ``<pad>`` (id 0) on the
    right; ``<unk>`` for unknown words.  Exposes the SmolVLM special tokens as named special tokens
    (``tok.fake_image_token_id``, ``tok.global_image_token_id``, ...), saved in tokenizer_config.json.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(_vocabulary())}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=_UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, vocab[_BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=_PAD,
        unk_token=_UNK,
        bos_token=_BOS,
        eos_token=_EOS,
        extra_special_tokens=dict(_SMOLVLM_SPECIALS),
        padding_side="right",
        truncation_side="right",
        model_max_length=TINY_VOCAB_SIZE,
    )
    tok.save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------------------------------
# The pi0 / pi05 size patch
# ---------------------------------------------------------------------------------------------------

_PATCH_LOCK = threading.RLock()
_WRAPPED_ATTR = "_lerobot_ript_tiny_vla_original_init"
_INSTALLED_PERMANENTLY = False  # set by install_tiny_vla_sizes(); tiny_vla_sizes() then never uninstalls


def is_tiny_vla_config(config: Any) -> bool:
    """True when ``config`` (a policy config) carries :data:`TINY_VLA_TAG` in ``config.tags``."""
    return TINY_VLA_TAG in (getattr(config, "tags", None) or [])


def _pi_modules() -> list[tuple[Any, str]]:
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    return [(modeling_pi0, "PI0Pytorch"), (modeling_pi05, "PI05Pytorch")]


def _tiny_module_globals(module: Any) -> dict[str, Any]:
    """Replacements for the size helpers ``module`` (modeling_pi0 / modeling_pi05) looks up."""
    gemma_config_cls = module.GemmaConfig
    real_paligemma = module.PaliGemmaForConditionalGenerationWithPiGemma
    real_expert = module.PiGemmaForCausalLM
    image_token_id = _token_id(_SMOLVLM_SPECIALS["image_token"])

    def get_gemma_config(variant: str):
        if variant not in _PI_GEMMA_SIZES:
            raise ValueError(f"Unknown variant: {variant}")
        width, depth, mlp_dim, heads, kv_heads, head_dim = _PI_GEMMA_SIZES[variant]
        return gemma_config_cls(
            width=width,
            depth=depth,
            mlp_dim=mlp_dim,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
        )

    def paligemma_factory(config):
        config.text_config.vocab_size = TINY_VOCAB_SIZE
        if hasattr(config, "_vocab_size"):
            config._vocab_size = TINY_VOCAB_SIZE  # noqa: SLF001
        config.image_token_index = image_token_id
        if hasattr(config, "image_token_id"):
            config.image_token_id = image_token_id
        vision = config.vision_config
        for key, value in _PI_VISION.items():
            setattr(vision, key, value)
        vision.projection_dim = config.text_config.hidden_size  # the projector maps into the text width
        config.projection_dim = config.text_config.hidden_size
        config.text_config.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        return real_paligemma(config=config)

    def expert_factory(config):
        config.vocab_size = TINY_VOCAB_SIZE  # its lm_head stays in the state dict
        return real_expert(config=config)

    return {
        "get_gemma_config": get_gemma_config,
        "PaliGemmaForConditionalGenerationWithPiGemma": paligemma_factory,
        "PiGemmaForCausalLM": expert_factory,
    }


def _make_init_wrapper(module: Any, original_init):
    @functools.wraps(original_init)
    def __init__(self, config, *args, **kwargs):  # noqa: N807
        if not is_tiny_vla_config(config):
            return original_init(self, config, *args, **kwargs)
        replacements = _tiny_module_globals(module)
        with _PATCH_LOCK:
            saved = {name: getattr(module, name) for name in replacements}
            try:
                for name, value in replacements.items():
                    setattr(module, name, value)
                return original_init(self, config, *args, **kwargs)
            finally:
                for name, value in saved.items():
                    setattr(module, name, value)

    setattr(__init__, _WRAPPED_ATTR, original_init)
    return __init__


def _install() -> None:
    with _PATCH_LOCK:
        for module, cls_name in _pi_modules():
            cls = getattr(module, cls_name)
            if not hasattr(cls.__init__, _WRAPPED_ATTR):
                cls.__init__ = _make_init_wrapper(module, cls.__init__)


def install_tiny_vla_sizes() -> None:
    """Patch, for the rest of the process, ``PI0Pytorch.__init__`` and ``PI05Pytorch.__init__`` so that
    configs tagged :data:`TINY_VLA_TAG` build the tiny architecture.  Idempotent; configs without the tag
    (every real checkpoint) are not affected.  A later ``tiny_vla_sizes()`` block leaves it installed."""
    global _INSTALLED_PERMANENTLY
    with _PATCH_LOCK:
        _install()
        _INSTALLED_PERMANENTLY = True


def _uninstall_tiny_vla_sizes() -> None:
    with _PATCH_LOCK:
        for module, cls_name in _pi_modules():
            cls = getattr(module, cls_name)
            original = getattr(cls.__init__, _WRAPPED_ATTR, None)
            if original is not None:
                cls.__init__ = original


@contextlib.contextmanager
def tiny_vla_sizes() -> Iterator[None]:
    """``install_tiny_vla_sizes()`` for the duration of a ``with`` block (left installed if it already was)."""
    with _PATCH_LOCK:
        already = all(hasattr(getattr(m, c).__init__, _WRAPPED_ATTR) for m, c in _pi_modules())
        _install()
    try:
        yield
    finally:
        if not already and not _INSTALLED_PERMANENTLY:
            _uninstall_tiny_vla_sizes()


# ---------------------------------------------------------------------------------------------------
# Configs, stats, processors
# ---------------------------------------------------------------------------------------------------


def policy_class(kind: str):
    """``PI0Policy`` / ``PI05Policy`` / ``SmolVLAPolicy`` for ``kind``."""
    if kind == "pi0":
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy

        return PI0Policy
    if kind == "pi05":
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy

        return PI05Policy
    if kind == "smolvla":
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        return SmolVLAPolicy
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _features(state_dim: int, action_dim: int, image_keys: Sequence[str], image_size: int):
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.utils.constants import ACTION, OBS_STATE

    inputs = {
        key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, image_size, image_size)) for key in image_keys
    }
    inputs[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    return inputs, outputs


def make_tiny_vla_config(
    kind: str,
    *,
    state_dim: int = 39,
    action_dim: int = 4,
    chunk_size: int = 8,
    image_keys: Sequence[str] = ("observation.images.corner2",),
    image_size: int = 32,
    vlm_dir: Path | None = None,
):
    """The policy config a tiny checkpoint is saved with (SmolVLA needs ``vlm_dir``, a folder written by
    :func:`_write_tiny_smolvlm`)."""
    inputs, outputs = _features(state_dim, action_dim, image_keys, image_size)
    common = dict(
        input_features=inputs,
        output_features=outputs,
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        max_state_dim=max(32, state_dim),
        max_action_dim=max(32, action_dim),
        device="cpu",
        push_to_hub=False,
        tags=[TINY_VLA_TAG],
    )
    if kind == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config

        return PI0Config(num_inference_steps=3, image_resolution=(image_size, image_size), **common)
    if kind == "pi05":
        from lerobot.policies.pi05.configuration_pi05 import PI05Config

        return PI05Config(num_inference_steps=3, image_resolution=(image_size, image_size), **common)
    if kind == "smolvla":
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

        if vlm_dir is None:
            raise ValueError("smolvla needs vlm_dir (a local tiny SmolVLM folder)")
        return SmolVLAConfig(
            num_steps=3,
            resize_imgs_with_padding=(image_size, image_size),
            vlm_model_name=str(Path(vlm_dir).resolve()),
            load_vlm_weights=False,
            num_vlm_layers=_SMOLVLM_TEXT["num_hidden_layers"],
            **common,
        )
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def synthetic_dataset_stats(
    state_dim: int,
    action_dim: int,
    image_keys: Sequence[str] = (),
    *,
    seed: int = 0,
    num_samples: int = 512,
) -> dict[str, dict[str, Any]]:
    """LeRobot-style stats (numpy arrays) computed from seeded synthetic samples, so every statistic is
    consistent: mean / std / min / max / q01 / q10 / q50 / q90 / q99 / count for state and action
    (actions in [-1, 1], like Meta-World), and per-channel image stats of shape (3, 1, 1)."""
    import numpy as np
    from lerobot.utils.constants import ACTION, OBS_STATE

    rng = np.random.default_rng(seed)

    def summarise(x: np.ndarray) -> dict[str, np.ndarray]:
        q = {f"q{p:02d}": np.quantile(x, p / 100, axis=0).astype(np.float32) for p in (1, 10, 50, 90, 99)}
        return {
            "mean": x.mean(axis=0).astype(np.float32),
            "std": x.std(axis=0).astype(np.float32),
            "min": x.min(axis=0).astype(np.float32),
            "max": x.max(axis=0).astype(np.float32),
            **q,
            "count": np.array([len(x)], dtype=np.int64),
        }

    centre = rng.normal(0.0, 0.5, size=state_dim)
    scale = rng.uniform(0.1, 1.0, size=state_dim)
    state = centre + scale * rng.normal(size=(num_samples, state_dim))
    action = np.clip(rng.normal(0.0, 0.5, size=(num_samples, action_dim)), -1.0, 1.0)
    stats = {OBS_STATE: summarise(state), ACTION: summarise(action)}
    for key in image_keys:
        pixels = rng.uniform(0.0, 1.0, size=(num_samples, 3))
        stats[key] = {k: (v.reshape(3, 1, 1) if k != "count" else v) for k, v in summarise(pixels).items()}
    return stats


@contextlib.contextmanager
def _local_paligemma_tokenizer(tokenizer_dir: Path) -> Iterator[None]:
    """Bind ``TokenizerProcessorStep`` in the pi0 / pi05 processor modules to a function that forces
    ``tokenizer_name`` to ``tokenizer_dir`` (their factories hard-code the gated PaliGemma tokenizer)."""
    from lerobot.policies.pi0 import processor_pi0
    from lerobot.policies.pi05 import processor_pi05
    from lerobot.processor import TokenizerProcessorStep

    def local_step(*args, **kwargs):
        kwargs.pop("tokenizer", None)
        kwargs["tokenizer_name"] = str(tokenizer_dir)
        return TokenizerProcessorStep(*args, **kwargs)

    modules = (processor_pi0, processor_pi05)
    with _PATCH_LOCK:
        saved = [m.TokenizerProcessorStep for m in modules]
        try:
            for m in modules:
                m.TokenizerProcessorStep = local_step
            yield
        finally:
            for m, original in zip(modules, saved, strict=True):
                m.TokenizerProcessorStep = original


def _write_tiny_smolvlm(vlm_dir: Path, tokenizer_dir: Path, image_size: int) -> Path:
    """A local SmolVLM folder: tiny ``SmolVLMConfig`` (Llama text part, small vision part) + a
    ``SmolVLMProcessor`` holding the tokenizer.  No weights (``load_vlm_weights=False``)."""
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    vlm_dir = Path(vlm_dir)
    vlm_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vision = dict(_SMOLVLM_VISION, image_size=image_size, model_type="smolvlm_vision")
    text = dict(
        _SMOLVLM_TEXT,
        model_type="llama",
        vocab_size=TINY_VOCAB_SIZE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=text,
        scale_factor=_SMOLVLM_SCALE_FACTOR,
        image_token_id=tokenizer.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(str(vlm_dir))
    patches = image_size // _SMOLVLM_VISION["patch_size"]
    image_seq_len = patches * patches // (_SMOLVLM_SCALE_FACTOR**2)
    size = {"longest_edge": image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=image_seq_len,
    )
    processor.save_pretrained(str(vlm_dir))
    return vlm_dir


# ---------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------


def make_tiny_vla_checkpoint(
    kind: str,
    directory: Path,
    *,
    state_dim: int = 39,
    action_dim: int = 4,
    chunk_size: int = 8,
    image_keys: Sequence[str] = ("observation.images.corner2",),
    image_size: int = 32,
    dataset_stats: dict | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny random ``kind`` policy ("pi0" | "pi05" | "smolvla") and save it, with its LeRobot
    pre / post processors and a local tokenizer (and, for SmolVLA, a local tiny SmolVLM folder), as a
    checkpoint directory.  Returns ``directory``.  Reload pi0 / pi05 under :func:`install_tiny_vla_sizes`
    (see the module docstring); SmolVLA reloads with no patch."""
    import torch
    from lerobot.policies.factory import make_pre_post_processors

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    image_keys = tuple(image_keys)
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(directory / "tokenizer")
    vlm_dir = _write_tiny_smolvlm(directory / "vlm", tokenizer_dir, image_size) if kind == "smolvla" else None

    config = make_tiny_vla_config(
        kind,
        state_dim=state_dim,
        action_dim=action_dim,
        chunk_size=chunk_size,
        image_keys=image_keys,
        image_size=image_size,
        vlm_dir=vlm_dir,
    )
    if dataset_stats is None:
        dataset_stats = synthetic_dataset_stats(state_dim, action_dim, image_keys, seed=seed)

    # Seed only a private generator's worth of state: save and restore torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tiny_vla_sizes():
            policy = policy_class(kind)(config)
        if kind == "pi05":
            _as_if_trained_adarms(policy)
    policy.save_pretrained(directory)

    with _local_paligemma_tokenizer(tokenizer_dir):
        pre, post = make_pre_post_processors(config, dataset_stats=dataset_stats)
    pre.save_pretrained(directory)
    post.save_pretrained(directory)
    _check_processor_json(directory, kind, tokenizer_dir, vlm_dir)
    return directory


def _as_if_trained_adarms(policy, std: float = 0.1) -> None:
    """LeRobot initialises pi05's adaRMS `dense` layers (condition -> scale, shift, gate) to zero, so a fresh
    model ignores its condition; a trained checkpoint's are not zero. Give them random weights, as training
    would, so that the condition (flow time, and the ript label added to it) acts in the tiny model."""
    import torch

    expert = policy.model.paligemma_with_expert.gemma_expert.model
    with torch.no_grad():
        for module in expert.modules():
            dense = getattr(module, "dense", None)
            if isinstance(dense, torch.nn.Linear):
                dense.weight.normal_(0.0, std)


def _check_processor_json(directory: Path, kind: str, tokenizer_dir: Path, vlm_dir: Path | None) -> None:
    data = json.loads((directory / "policy_preprocessor.json").read_text())
    names = [
        step.get("config", {}).get("tokenizer_name")
        for step in data["steps"]
        if step.get("registry_name") == "tokenizer_processor"
    ]
    expected = str(vlm_dir if kind == "smolvla" else tokenizer_dir)
    if names != [expected]:
        raise RuntimeError(f"saved preprocessor names tokenizer(s) {names}, expected [{expected!r}]")


# ---------------------------------------------------------------------------------------------------
# Reload helpers
# ---------------------------------------------------------------------------------------------------


def assert_same_weights(policy, directory: Path) -> int:
    """Raise unless ``policy``'s state dict equals ``directory/model.safetensors`` exactly (same keys,
    same values).  Catches pi0 / pi05 ``from_pretrained`` silently returning a random model.  Returns the
    number of tensors compared."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / "model.safetensors"))
    current = policy.state_dict()
    missing = sorted(set(saved) - set(current))
    extra = sorted(set(current) - set(saved))
    # save_pretrained drops tied / shared duplicates; allow keys only present in memory if they alias one
    # that was saved.
    data_ptrs = {t.data_ptr() for k, t in current.items() if k in saved}
    extra = [k for k in extra if current[k].data_ptr() not in data_ptrs]
    if missing or extra:
        raise AssertionError(
            f"state dict keys differ: missing in policy {missing[:5]}, not saved {extra[:5]}"
        )
    for key, value in saved.items():
        if not torch.equal(current[key].detach().cpu(), value):
            raise AssertionError(f"weights differ from the checkpoint at {key}")
    return len(saved)


def load_tiny_vla_policy(kind: str, directory: Path):
    """``<Policy>.from_pretrained(directory)`` under :func:`tiny_vla_sizes`, verified with
    :func:`assert_same_weights`."""
    with tiny_vla_sizes():
        policy = policy_class(kind).from_pretrained(str(directory))
    assert_same_weights(policy, directory)
    return policy
