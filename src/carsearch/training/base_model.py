"""Build the compact SigLIP base model: a real `SiglipModel`, small enough for two CPU cores.

No model hub is reachable on the machines this project runs on, so the default base is
built here: a randomly initialised `transformers.SiglipModel` with a Unigram tokenizer
trained (with the `tokenizers` library) on a vocabulary of vehicle descriptions, and a
`SiglipImageProcessor` configuration. Everything is written with `save_pretrained`, so
`AutoModel.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it exactly
as they load `google/siglip-base-patch16-224`; the rest of the project never knows the
difference. The project pre-trains and fine-tunes it later.

Text follows SigLIP's convention: lowercase, an end-of-sequence token `</s>` appended,
then padded on the right with `</s>` up to the model's maximum length. SigLIP's text
tower pools the LAST position, so every text must be padded to that length
(`padding="max_length"`); the encoder always does so.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from carsearch.platform.models.encoder import quiet_config_check
from carsearch.platform.vehicles import (
    BODY_ALIASES,
    BODY_TYPES,
    COLOUR_ALIASES,
    MAKE_ALIASES,
    parse_class_name,
)

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# The same ids google's SigLIP checkpoints use: <pad>=0, </s>=1, <unk>=2. As there, the
# padding token the tokenizer uses is </s>, so the last position is always </s>.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

BUILD_INFO = "build_info.json"

# Characters every text may hold, whether or not the corpus has them.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789" + "-'&./,:;!?()+#\"éèëöüäñç"

_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "with", "and", "or", "on", "for", "from", "to", "like",
    "car", "cars", "truck", "trucks", "vehicle", "auto", "automobile", "photo", "picture",
    "image", "model", "models", "make", "year", "years", "older", "old", "newer", "new",
    "late", "early", "mid", "recent", "vintage", "classic", "modern", "around", "about",
    "circa", "era", "generation", "gen", "s", "'s", "colour", "color", "coloured", "colored",
    "paint", "painted", "dark", "light", "bright", "metallic", "matte", "shiny", "two",
    "tone", "door", "doors", "2-door", "4-door", "sports", "sport", "luxury", "family",
    "small", "big", "large", "compact", "full", "size", "midsize", "fast", "cheap",
    "expensive", "parked", "street", "road", "side", "front", "rear", "view", "shot",
    "lifted", "cab", "bed", "long", "short", "wheel", "base", "edition", "trim", "package",
    "hybrid", "electric", "diesel", "turbo", "v8", "v6", "awd", "4wd", "fwd", "rwd",
    "1990s", "2000s", "2010s", "2020s", "80s", "90s", "nineties", "eighties", "seventies",
    "something", "looking", "kind", "type", "any", "some", "my", "that", "this", "one",
)


@dataclass(frozen=True)
class TowerSize:
    """The width and depth of one transformer tower."""

    hidden: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4


@dataclass(frozen=True)
class CompactSpec:
    """Everything that decides the shape of the compact base model."""

    image_size: int = 64
    # 16 px patches (16 tokens at 64 px) rather than 8 (64 tokens): 2.6x faster steps on
    # two cores, and from random weights it learns faster per step too (docs/BENCHMARKS.md,
    # "Demo model recipe").
    patch_size: int = 16
    text_max_length: int = 12
    vocab_size: int = 4000
    vision: TowerSize = TowerSize()
    text: TowerSize = TowerSize()


def stanford_class_names(meta_path: Path | None = None) -> list[str]:
    """The 196 Stanford Cars class names from cars_meta.mat, or [] where it is absent."""
    path = meta_path or _default_meta_path()
    if path is None or not path.is_file():
        return []
    from scipy.io import loadmat

    try:
        meta = loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); using the built-in vocabulary only", path, exc)
        return []
    return [str(name).strip() for name in meta["class_names"] if str(name).strip()]


def _default_meta_path() -> Path | None:
    env = os.environ.get("CARSEARCH_STANFORD_ROOT")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[3]
    candidates += [repo.parent / "shared" / "stanford_cars", repo / "shared" / "stanford_cars"]
    for root in candidates:
        if (root / "cars_meta.mat").is_file():
            return root / "cars_meta.mat"
    return None


def _year_words() -> Iterator[str]:
    for year in range(1950, 2031):
        yield str(year)
        yield f"'{year % 100:02d}"
        yield f"{year % 100:02d}"


def _class_sentences(class_names: Iterable[str]) -> Iterator[str]:
    """Descriptions of each class: full name, and colour / alias variants."""
    colours = [alias for aliases in COLOUR_ALIASES.values() for alias in aliases]
    for name in class_names:
        label = parse_class_name(name)
        aliases = MAKE_ALIASES.get(label.make, (label.make.lower(),))
        body = (label.body_type or "car").lower()
        year = str(label.year) if label.year else ""
        yield name
        for i, colour in enumerate(colours):
            alias = aliases[i % len(aliases)]
            yield f"a {colour} {year} {alias} {label.model} {body}"
            if label.year:
                yield f"{colour} {alias} {label.model} from '{label.year % 100:02d}"


def vehicle_corpus(class_names: Iterable[str] = ()) -> Iterator[str]:
    """The built-in vocabulary of vehicle descriptions, one line at a time."""
    yield from _WORDS
    for make, aliases in MAKE_ALIASES.items():
        yield make
        yield from aliases
    yield from BODY_TYPES
    yield from BODY_ALIASES
    for aliases in COLOUR_ALIASES.values():
        yield from aliases
    yield from _year_words()
    for colour in COLOUR_ALIASES:
        for body in BODY_ALIASES:
            yield f"{colour} {body}"
            yield f"older model {colour} {body} car"
            yield f"a newer {colour} {body} truck from the late 2000s"
    yield from _class_sentences(class_names)


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> Tokenizer:
    """A lowercase byte-pair tokenizer that ends every text with </s>, as SigLIP's does.

    Words are split on spaces only (sentencepiece style, "▁" marks a word start), so
    "'12", "pick-up" and "mercedes-benz" stay whole where the corpus has them.
    """
    tokenizer = Tokenizer(BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return tokenizer


def _fast_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        # As SigLIP's own tokenizer: the model reads no attention mask; it pools the
        # last position, which padding to max_length makes </s>.
        model_input_names=["input_ids"],
    )


def _tower(size: TowerSize) -> dict[str, int]:
    return {
        "hidden_size": size.hidden,
        "intermediate_size": size.hidden * size.mlp_ratio,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
    }


def compact_config(spec: CompactSpec, vocab_size: int) -> SiglipConfig:
    """The SiglipConfig for a spec and a trained vocabulary size."""
    text = SiglipTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=spec.text_max_length,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=1,
        projection_size=spec.vision.hidden,
        **_tower(spec.text),
    )
    vision = SiglipVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, **_tower(spec.vision)
    )
    return SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


# The bias starts at the prior log-odds of a positive pair in the batches two CPU cores
# train with (about -log 64), not at the paper's -10, which suits 32k-pair batches. From
# random weights Adam moves a scalar by about lr per step, so a bias of -10 stays there,
# and both towers collapse to constant embeddings to fit the base rate instead (measured
# on the rendered catalogue: loss stuck on the bias-only floor, mAP at chance).
INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -4.0
# The text tower pools the last position, always `</s>`. With that token's embedding at
# zero and small position embeddings, what reaches the last position at initialisation is
# what attention gathers from the content tokens, so unrelated texts start apart (mean
# cosine ~0.6 instead of ~0.95) and training does not begin from collapsed text features.
TEXT_POSITION_INIT_SCALE = 0.1


def init_model(config: SiglipConfig, seed: int) -> SiglipModel:
    """A randomly initialised SiglipModel, identical for the same seed.

    The temperature starts where the SigLIP paper starts it (t' = log 10) and the bias at
    `INIT_LOGIT_BIAS`, not at transformers' zeros; the text embeddings are adjusted as
    described at `TEXT_POSITION_INIT_SCALE`. The result is an ordinary SiglipModel.
    """
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(INIT_LOGIT_SCALE)
        model.logit_bias.fill_(INIT_LOGIT_BIAS)
        embeddings = model.text_model.embeddings
        embeddings.position_embedding.weight.mul_(TEXT_POSITION_INIT_SCALE)
        eos_id = config.text_config.eos_token_id
        if eos_id is not None:
            embeddings.token_embedding.weight[eos_id].zero_()
    return model.eval()


def image_processor(image_size: int, mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
                    ) -> SiglipImageProcessorPil:
    """Resize to a square of `image_size`, scale to [0, 1], normalise by `mean` / `std`
    (SigLIP's own: 0.5 / 0.5, i.e. [-1, 1])."""
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_compact_base(
    out_dir: Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
    spec: CompactSpec | None = None,
    class_names: Iterable[str] | None = None,
) -> Path:
    """Build the compact SigLIP base model into `out_dir` and return `out_dir`.

    `corpus` adds lines to the tokenizer's training text; `class_names` replaces the
    Stanford Cars class names read from cars_meta.mat (where present). `image_size`,
    where given, overrides `spec.image_size` (64 by default), and `patch_size`
    `spec.patch_size` (16). The same seed and inputs give identical weights.
    """
    spec = spec or CompactSpec()
    if image_size is not None and image_size != spec.image_size:
        spec = CompactSpec(**{**_spec_fields(spec), "image_size": image_size})
    if patch_size is not None and patch_size != spec.patch_size:
        spec = CompactSpec(**{**_spec_fields(spec), "patch_size": patch_size})
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image size {spec.image_size} is not a multiple of {spec.patch_size}")
    names = list(class_names) if class_names is not None else stanford_class_names()
    lines = [*vehicle_corpus(names), *(corpus or ())]
    tokenizer = _fast_tokenizer(train_tokenizer(lines, spec.vocab_size), spec.text_max_length)
    config = compact_config(spec, vocab_size=len(tokenizer))
    model = init_model(config, seed)
    processor = SiglipProcessor(
        image_processor=image_processor(spec.image_size), tokenizer=tokenizer
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_config_check():
        model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = build_info(model, spec, seed=seed, class_names=len(names), corpus_lines=len(lines))
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("built compact SigLIP base (%d parameters) in %s", info["parameters"], out_dir)
    return out_dir


def _spec_fields(spec: CompactSpec) -> dict[str, Any]:
    return {
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "text_max_length": spec.text_max_length,
        "vocab_size": spec.vocab_size,
        "vision": spec.vision,
        "text": spec.text,
    }


def build_info(
    model: SiglipModel, spec: CompactSpec, *, seed: int, class_names: int, corpus_lines: int
) -> dict[str, Any]:
    """The summary written beside the weights as build_info.json."""
    return {
        "kind": "compact-siglip",
        "seed": seed,
        "parameters": parameter_count(model),
        "text_parameters": parameter_count(model.text_model),
        "vision_parameters": parameter_count(model.vision_model),
        "embedding_dim": model.config.vision_config.hidden_size,
        "vocab_size": model.config.text_config.vocab_size,
        "spec": asdict(spec),
        "tokenizer_corpus_lines": corpus_lines,
        "stanford_class_names": class_names,
        "pretrained": False,
    }
