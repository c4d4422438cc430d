"""What a run will cost: the dated price table, the providers' image-token rules, the estimate.

* :func:`load_prices` reads the dated price table shipped as ``dfk8s/cost/prices.yaml`` (or
  ``--prices FILE``).
* :class:`Tally` collects, during planning, what the requests will carry (text, image sizes);
  :func:`estimate` prices it in sync and batch mode.

Actual usage is :mod:`dfk8s.cost.usage`; the budget during a run is :mod:`dfk8s.cost.budget`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from dfk8s.cost.usage import Usage
from dfk8s.errors import SpecError
from dfk8s.inputs.resize import fitted
from dfk8s.servings import SERVINGS, serving_info

log = logging.getLogger(__name__)

#: The price table shipped in the package.
DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")
#: An input image whose size is not known at plan time (an s3:// image the plan did not open).
UNKNOWN_IMAGE_SIZE = (1024, 1024)


def usd(amount: float) -> str:
    """A price as people read it: cents for big sums, more digits for small ones."""
    if amount >= 100:
        return f"${amount:,.2f}"
    return f"${amount:,.4f}" if amount >= 0.01 else f"${amount:.6f}"


# ----- image tokens --------------------------------------------------------------------------------


def tile_tokens(width: int, height: int, base: int, tile: int) -> int:
    """OpenAI's 512px-tile rule (detail high): fit in 2048x2048, shortest side to 768, base + tile x tiles."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        k = 2048 / max(w, h)
        w, h = w * k, h * k
    if min(w, h) > 768:
        k = 768 / min(w, h)
        w, h = w * k, h * k
    tiles = math.ceil(w / 512 - 1e-9) * math.ceil(h / 512 - 1e-9)
    return base + tile * tiles


def patch_tokens(width: int, height: int, multiplier: float, cap: int = 1536, patch: int = 32) -> int:
    """OpenAI's 32px-patch rule: patches covering the image, scaled down to at most ``cap``, x multiplier."""
    pw, ph = math.ceil(width / patch), math.ceil(height / patch)
    if pw * ph > cap:
        shrink = math.sqrt(cap * patch * patch / (width * height))
        w, h = width * shrink, height * shrink
        fit = math.floor(w / patch) / (w / patch)  # a whole number of patches across
        w, h = w * fit, h * fit
        pw, ph = math.ceil(w / patch - 1e-9), math.ceil(h / patch - 1e-9)
    return math.ceil(min(pw * ph, cap) * multiplier)


def gemini_tokens(width: int, height: int, tile: int = 258) -> int:
    """Gemini's rule: ``tile`` tokens for an image <=384px on both sides, else that per 768x768 tile."""
    if width <= 384 and height <= 384:
        return tile
    return math.ceil(width / 768) * math.ceil(height / 768) * tile


# ----- the price table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices (USD), as in the table (see the comments at the top of prices.yaml)."""

    name: str
    provider: str
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    image_input_per_mtok: float | None = None
    image_output_per_mtok: float | None = None
    image_tokens: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    image_output_tokens: dict = field(default_factory=dict)
    typical_output_tokens: int | None = None
    max_output_tokens: int | None = None
    batch_discount: float = 0.0

    @classmethod
    def from_dict(cls, name: str, data: dict) -> ModelPrice:
        """Build from a table entry; unknown keys are a mistake worth a clear error."""
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"price table: model {name}: unknown keys {', '.join(unknown)}")
        return cls(name=name, **data)

    def to_dict(self) -> dict:
        """The entry as stored in cost.json (workers price usage with it)."""
        return asdict(self)

    def image_input_tokens(self, width: int, height: int) -> int:
        """Input tokens of one image of this size, by the model's rule."""
        rule = self.image_tokens or {}
        kind = rule.get("rule")
        if kind == "tiles":
            return tile_tokens(width, height, int(rule["base"]), int(rule["tile"]))
        if kind == "patches":
            return patch_tokens(width, height, float(rule["multiplier"]))
        if kind == "gemini":
            return gemini_tokens(width, height, int(rule.get("tile", 258)))
        if kind == "fixed":
            return int(rule["tokens"])
        return 0

    def image_rule(self) -> str:
        """The image-token rule in words, for the estimate."""
        rule = self.image_tokens or {}
        kind = rule.get("rule")
        if kind == "tiles":
            return f"{rule['base']} + {rule['tile']} per 512px tile (fit 2048, short side 768)"
        if kind == "patches":
            return f"32px patches (max 1536) x {rule['multiplier']}"
        if kind == "gemini":
            return f"{rule.get('tile', 258)} per image <=384px, else per 768px tile"
        if kind == "fixed":
            return f"{rule['tokens']} per image"
        return "images not priced"

    def cost(self, usage: Usage, *, batch: bool = False) -> float:
        """USD for ``usage``, at batch price when ``batch``."""
        text_in = max(0, usage.input_tokens - usage.input_image_tokens)
        text_out = max(0, usage.output_tokens - usage.output_image_tokens)
        image_in_rate = self.image_input_per_mtok if self.image_input_per_mtok is not None else \
            self.input_per_mtok
        image_out_rate = self.image_output_per_mtok if self.image_output_per_mtok is not None else \
            self.output_per_mtok
        usd = (text_in * self.input_per_mtok + usage.input_image_tokens * image_in_rate
               + text_out * self.output_per_mtok + usage.output_image_tokens * image_out_rate) / 1e6
        usd += usage.priced_images_usd
        return usd * (1 - self.batch_discount) if batch else usd

    def image_price(self, quality: str | None, size: str | None) -> tuple[float, str]:
        """Per-image price of a generated image, and how it was chosen (for the estimate).

        Raises:
            SpecError: The table has no price for this quality and size.
        """
        if not self.per_image:
            raise SpecError(f"no per-image price known for {self.name}")
        qualities = self.per_image
        how = []
        if quality in (None, "auto"):
            asked = quality or "unset"
            quality = max(qualities, key=lambda q: max(qualities[q].values()))
            how.append(f"quality {asked} priced as {quality}, the most it can cost")
        if quality not in qualities:
            raise SpecError(f"no price known for {self.name} at quality {quality}")
        sizes = qualities[quality]
        if size in (None, "auto"):
            size = max(sizes, key=sizes.get)
            how.append(f"size auto priced as {size}, the most it can cost")
        if size not in sizes:
            raise SpecError(f"no price known for {self.name} at size {size}")
        return float(sizes[size]), ", ".join(how)


@dataclass(frozen=True)
class PriceTable:
    """A dated price table: where it came from and its models."""

    name: str
    date: str
    path: str
    sources: tuple[str, ...]
    models: dict[str, dict]

    def price(self, model: str) -> ModelPrice:
        """The prices of ``model``.

        Raises:
            SpecError: ``no price known for MODEL`` (never a guess).
        """
        key = model.removeprefix("models/")
        entry = self.models.get(key)
        if entry is None:
            raise SpecError(f"no price known for {model} in {self.describe()}; add it to a copy of the table "
                            "and pass --prices FILE")
        return ModelPrice.from_dict(key, entry)

    def describe(self) -> str:
        """``dfk8s built-in prices (2026-11-30, /path/prices.yaml)``."""
        return f"{self.name} ({self.date}, {self.path})"


def load_prices(path: str | None = None) -> PriceTable:
    """Read a price table (the package's own when ``path`` is None).

    Raises:
        SpecError: The file is missing, not YAML, or lacks ``date`` or ``models``.
    """
    where = Path(path).expanduser() if path else DEFAULT_PRICES
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"--prices {where}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"--prices {where}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data.get("date"):
        raise SpecError(f"--prices {where}: a price table needs 'date' and 'models' (see dfk8s/prices.yaml)")
    sources = data.get("sources") or []
    return PriceTable(name=str(data.get("table") or where.name), date=str(data["date"]), path=str(where),
                      sources=tuple(str(s) for s in sources), models=data["models"])


# ----- the estimate --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a run's requests will carry, collected row by row while planning (memory: one counter)."""

    rows: int = 0
    requests: int = 0
    text_chars: int = 0
    messages: int = 0
    image_sizes: Counter = field(default_factory=Counter)
    unknown_images: int = 0

    def add(self, shard_row: dict, sizes: list[tuple[int, int] | None], texts: list[str]) -> None:
        """Count one planned row: nothing is sent for a row with a plan-time error."""
        self.rows += 1
        if shard_row.get("error"):
            return
        self.requests += 1
        self.messages += len(texts)
        self.text_chars += sum(len(t) for t in texts)
        for size in sizes:
            if size is None:
                self.unknown_images += 1
            else:
                self.image_sizes[tuple(size)] += 1

    @property
    def images(self) -> int:
        """Input images over all requests."""
        return sum(self.image_sizes.values()) + self.unknown_images


def text_tokens(chars: int, messages: int = 0) -> int:
    """Text tokens from characters (about 4 per token) plus a few per message for the chat framing."""
    return math.ceil(chars / 4) + 4 * messages


@dataclass
class Estimate:
    """A run's estimated usage and price."""

    model: str
    table: str
    requests: int
    rows: int
    input_text_tokens: int = 0
    input_image_tokens: int = 0
    input_images: int = 0
    unknown_images: int = 0
    output_tokens: int = 0
    output_note: str = ""
    output_images: int = 0
    image_note: str = ""
    image_rule: str = ""
    sync_usd: float = 0.0
    batch_usd: float = 0.0
    batch_discount: float = 0.0
    api_mode: str = "sync"
    max_image_side: int | None = None
    unscaled_image_tokens: int = 0
    unscaled_sync_usd: float = 0.0
    no_cost: str = ""
    batch_note: str = ""

    @property
    def usd(self) -> float:
        """The price in the run's mode."""
        return self.batch_usd if self.api_mode == "batch" else self.sync_usd

    def to_dict(self) -> dict:
        """JSON form (cost.json)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The estimate as the CLI prints it."""
        if self.no_cost:
            return [f"  cost: {self.no_cost}"]
        bad = self.rows - self.requests
        out = [f"  prices: {self.table}", f"  model {self.model}: {self.requests:,} requests"
               + (f" ({bad:,} {'row fails' if bad == 1 else 'rows fail'} at plan time, no request)"
                  if bad else "")]
        inputs = f"  input: {self.input_text_tokens:,} text tokens (characters / 4)"
        if self.input_images:
            inputs += (f" + {self.input_image_tokens:,} image tokens for {self.input_images:,} images "
                       f"({self.image_rule})")
            if self.unknown_images:
                inputs += (f"; {self.unknown_images:,} of unknown size counted as "
                           f"{UNKNOWN_IMAGE_SIZE[0]}x{UNKNOWN_IMAGE_SIZE[1]}")
        out.append(inputs)
        if self.output_images:
            out.append(f"  output: {self.output_images:,} images" + (f" ({self.image_note})"
                                                                     if self.image_note else ""))
        if self.output_tokens:
            out.append(f"  output: {self.output_tokens:,} tokens ({self.output_note})")
        mine = " <- this run" if self.api_mode == "sync" else ""
        out.append(f"  price sync: {usd(self.sync_usd)}{mine}")
        mine = " <- this run" if self.api_mode == "batch" else ""
        if self.batch_note:
            out.append(f"  price batch: {self.batch_note}")
        else:
            out.append(f"  price batch ({self.batch_discount:.0%} off): {usd(self.batch_usd)}{mine}")
        if self.max_image_side and self.unscaled_image_tokens != self.input_image_tokens:
            saved = self.unscaled_sync_usd - self.sync_usd
            out.append(f"  --max-image-side {self.max_image_side}: image tokens "
                       f"{self.unscaled_image_tokens:,} -> {self.input_image_tokens:,}, "
                       f"saving {usd(saved)} sync")
        elif self.max_image_side:
            out.append(f"  --max-image-side {self.max_image_side}: no image is over it, no saving")
        return out


#: The output tokens a request may use when neither ``--max-tokens`` nor the table's ``max_output_tokens``
#: bounds it (the budget reserves this much for each such request; set --max-tokens to reserve less).
DEFAULT_MAX_OUTPUT_TOKENS = 16_384


def request_usage(price: ModelPrice, *, text_chars: int, messages: int, image_sizes: list[tuple[int, int]],
                  options: dict, output_images: bool, most: bool, answer_chars: int | None = None,
                  images_out: int | None = None) -> Usage:
    """One request's usage as priced before (or without) the provider's count.

    Args:
        price: The model's prices.
        text_chars: Characters of its text (system prompt and turns); tokens are characters / 4.
        messages: Its turns.
        image_sizes: Width and height of each image sent (after ``--max-image-side``).
        options: The run's options (``max_tokens``, ``images_per_prompt``, ``quality``, ``size``, ...).
        output_images: Whether the answer is images (text2image, imageedit).
        most: The most it can cost (the budget's reservation): ``--max-tokens`` or the table's
            ``max_output_tokens`` (else :data:`DEFAULT_MAX_OUTPUT_TOKENS`), or the dearest image. Else
            what it did cost, as far as the answer tells (``answer_chars``, ``images_out``).
        answer_chars: Characters of the answer's text (``most`` False).
        images_out: Images in the answer (``most`` False).
    """
    image_tokens = sum(price.image_input_tokens(w, h) for w, h in image_sizes)
    usage = Usage(input_tokens=text_tokens(text_chars, messages) + image_tokens,
                  input_image_tokens=image_tokens, requests=1)
    if output_images:
        count = int(options.get("images_per_prompt") or 1) if most or images_out is None else images_out
        usage.images = count
        if price.per_image:
            each, _ = price.image_price(options.get("quality"), options.get("size"))
            usage.priced_images_usd = each * count
        elif price.image_output_tokens:
            size = str(options.get("image_size") or "default").upper().replace("DEFAULT", "default")
            per = int(price.image_output_tokens.get(size, price.image_output_tokens.get("default", 0)))
            usage.output_tokens = usage.output_image_tokens = per * count
    elif most:
        usage.output_tokens = int(options.get("max_tokens") or price.max_output_tokens
                                  or DEFAULT_MAX_OUTPUT_TOKENS)
    else:
        usage.output_tokens = text_tokens(answer_chars or 0, 0)
    return usage


def run_model(serving: str, options: dict) -> str | None:
    """The model a run calls (None for servings that are not paid APIs)."""
    info = SERVINGS.get(serving)
    if info is None or not info.priced:
        return None
    return options.get("model") or info.defaults.get("model")


def estimate(tally: Tally, serving: str, options: dict, prices: PriceTable,
             pipeline: str | None = None) -> Estimate:
    """Price a tally for the run's serving and options, in sync and batch mode.

    Raises:
        SpecError: ``no price known for MODEL`` (also for an unpriced image quality or size).
    """
    model = run_model(serving, options)
    mode = options.get("api_mode") or "sync"
    if model is None:
        return Estimate(model=serving, table=prices.describe(), requests=tally.requests, rows=tally.rows,
                        api_mode=mode, no_cost=f"serving {serving} calls no paid API (local compute)")
    price = prices.price(model)
    side = options.get("max_image_side")
    image_tokens = unscaled = 0
    for (w, h), count in list(tally.image_sizes.items()) + [(UNKNOWN_IMAGE_SIZE, tally.unknown_images)]:
        if count:
            image_tokens += count * price.image_input_tokens(*fitted(w, h, side))
            unscaled += count * price.image_input_tokens(w, h)
    est = Estimate(model=model, table=prices.describe(), requests=tally.requests, rows=tally.rows,
                   input_text_tokens=text_tokens(tally.text_chars, tally.messages),
                   input_image_tokens=image_tokens, input_images=tally.images,
                   unknown_images=tally.unknown_images, image_rule=price.image_rule(),
                   batch_discount=price.batch_discount, api_mode=mode, max_image_side=side,
                   unscaled_image_tokens=unscaled)
    fixed_usd = 0.0
    output_image_tokens = 0
    if serving == "openai-chat":
        if options.get("max_tokens"):
            per = int(options["max_tokens"])
            est.output_note = f"{per} per request: --max-tokens, the most an answer can be"
        elif price.typical_output_tokens:
            per = int(price.typical_output_tokens)
            est.output_note = f"{per} per request: the table's typical answer, not a limit"
        else:
            raise SpecError(f"no typical output length known for {model}; pass --max-tokens")
        est.output_tokens = per * tally.requests
    else:
        n = int(options.get("images_per_prompt") or 1)
        est.output_images = n * tally.requests
        if price.per_image:
            each, how = price.image_price(options.get("quality"), options.get("size"))
            fixed_usd = each * est.output_images
            est.image_note = f"${each:g} each" + (f"; {how}" if how else "")
        elif price.image_output_tokens:
            size = str(options.get("image_size") or "default").upper().replace("DEFAULT", "default")
            per = int(price.image_output_tokens.get(size, price.image_output_tokens.get("default", 0)))
            output_image_tokens = per * est.output_images
            est.output_tokens = output_image_tokens
            est.output_note = f"{per} per image ({size} image size)"
            est.image_note = f"{per} output tokens each"
        else:
            raise SpecError(f"no image price known for {model}")
    base = Usage(input_tokens=est.input_text_tokens + image_tokens, input_image_tokens=image_tokens,
                 output_tokens=est.output_tokens, output_image_tokens=output_image_tokens,
                 priced_images_usd=fixed_usd)
    est.sync_usd = price.cost(base)
    est.batch_usd = price.cost(base, batch=True)
    if pipeline is not None and pipeline not in serving_info(serving).batch_pipelines:
        est.batch_note = f"not available for {pipeline} with {serving}"
    unscaled_usage = Usage(**{**base.to_dict(), "input_tokens": est.input_text_tokens + unscaled,
                              "input_image_tokens": unscaled, "priced_images_usd": fixed_usd})
    est.unscaled_sync_usd = price.cost(unscaled_usage)
    return est


def row_texts(pipeline, row: dict, input_key: str | None, system_prompt: str | None,
              prompt: str | None = None, turns=None) -> list[str]:
    """The texts one row's request carries (system prompt and turns); empty if the row is unusable.

    ``prompt`` is ``--prompt``: the user turn of a row without a conversation. ``turns``: the row's
    turns when the caller has read them already (the planner's check did).
    """
    from dfk8s.inputs.rows import RowProblem, strip_image_placeholders

    if turns is None:
        try:
            turns = pipeline.check_row(row, input_key, prompt)
        except RowProblem:
            return []
    system = system_prompt if system_prompt is not None else pipeline.system_prompt
    texts = [system] if system and not any(t.role == "system" for t in turns) else []
    return texts + [strip_image_placeholders(t.text) for t in turns]
