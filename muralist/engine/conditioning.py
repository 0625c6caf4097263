"""Text conditioning with A1111's semantics: prompts -> the tensors the UNet reads at each step.

- Chunks of 75 tokens (+BOS/EOS = 77): a prompt of any length is used whole, never truncated;
  ``BREAK`` starts a new chunk; a chunk that fills up within 20 tokens after a comma moves the
  words after the comma to the next chunk; an embedding is never split across chunks.
- One prompt's schedule texts (prompt editing, alternation) are encoded together, as A1111's
  ``get_learned_conditioning`` does: shorter texts get empty chunks up to the longest one's chunk
  count, and per chunk index the emphasis is applied over the whole batch ("Original": multiply,
  then restore the mean of all texts' vectors together). ``AND`` parts and the negative prompt
  are separate batches. The ``emphasis`` option ("Original", "No norm", "Ignore", "None") is A1111's.
- Which hidden layer feeds the UNet follows A1111 per family: SD1 the last (or with clip skip N
  the N-th from last, then the final norm); SD2 the penultimate with the norm; SDXL both
  encoders' penultimate layers without the norm, concatenated, plus the second's pooled output.
  SDXL's empty negative prompt is all zeros (A1111's force_zero_embeddings).
- Sampling switches tensors only at the steps where a schedule changes. Prompt and negative prompt
  keep their own lengths unless "Pad prompt/negative prompt" (``pad_cond_uncond``) is on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.family import Family
from ..models.loader import LoadedModel
from ..models.tokenizer import BOS_ID, EOS_ID, clip_tokenizer
from ..prompts.parser import parse_attention, prompt_schedule, split_and

CHUNK = 75
COMMA_BACKTRACK = 20
_COMMA = 267  # "," followed by a word boundary in CLIP's vocabulary ("</w>")
# A1111's "emphasis" option: "None" reads brackets and BREAK as plain text, "Ignore" parses them
# but applies no weights, "No norm" applies weights without restoring the mean.
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (position after BOS, embedding)


EmbeddingLookup = Callable[[list[int], int], tuple[Any, int] | None]


def encoder_keys(family: Family) -> list[tuple[str, str]]:
    """(text encoder component, embedding vector key) per encoder."""
    if family is Family.SDXL:
        return [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")]
    return [("text_encoder", "default")]


class EmbeddingIndex:
    """Finds textual-inversion embeddings in a token stream by their names' token ids (A1111)."""

    def __init__(self, embeddings: Mapping[str, Any], tokenizer: Any) -> None:
        self.by_first: dict[int, list[tuple[list[int], Any]]] = {}
        for name, emb in embeddings.items():
            ids = tokenizer(name, add_special_tokens=False).input_ids
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for options in self.by_first.values():
            options.sort(key=lambda x: -len(x[0]))  # longest name first

    def at(self, tokens: list[int], pos: int) -> tuple[Any, int] | None:
        for ids, emb in self.by_first.get(tokens[pos], ()):
            if tokens[pos : pos + len(ids)] == ids:
                return emb, len(ids)
        return None


def chunk_prompt(
    text: str,
    tokenizer: Any,
    index: EmbeddingIndex | None,
    vector_count: Callable[[Any], int],
    novelai_braces: bool = False,
    emphasis: str = "Original",
) -> tuple[list[Chunk], int]:
    """Split one prompt into 75-token chunks with multipliers; also return A1111's token count."""
    parsed = [(text, 1.0)] if emphasis == "None" else parse_attention(text, novelai_braces)
    pieces = [p for p, _ in parsed]
    ids_all = tokenizer(pieces, add_special_tokens=False, truncation=False).input_ids if pieces else []
    chunks: list[Chunk] = []
    chunk = Chunk()
    count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, count, last_comma
        count += len(chunk.tokens) if is_last else CHUNK
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for (piece, weight), ids in zip(parsed, ids_all, strict=True):
        if piece == "BREAK" and weight == -1:
            next_chunk()
            continue
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == _COMMA:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                # Move the words after the last comma into the next chunk, keeping phrases whole.
                cut = last_comma + 1
                moved_t, moved_m = chunk.tokens[cut:], chunk.multipliers[cut:]
                del chunk.tokens[cut:], chunk.multipliers[cut:]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_t, moved_m
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            found = index.at(ids, pos) if index is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                pos += 1
                continue
            emb, n_name = found
            n_vec = vector_count(emb)
            if len(chunk.tokens) + n_vec > CHUNK:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens) + 1, emb))
            chunk.tokens += [0] * n_vec
            chunk.multipliers += [weight] * n_vec
            pos += n_name
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, count


def token_count(prompt: str, steps: int = 20, embeddings: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """A1111's live counter: (tokens used, chunk limit), e.g. (76, 150) shows as "76/150".

    Extra-network tags are not counted; with prompt editing the longest scheduled text counts.
    """
    from ..prompts.parser import extract_extra_networks

    text, _ = extract_extra_networks(prompt)
    tok = clip_tokenizer()
    index = EmbeddingIndex(embeddings or {}, tok)
    used = 0
    for part, _w in split_and(text):
        for _, scheduled in prompt_schedule(part, steps):
            _, n = chunk_prompt(scheduled, tok, index, lambda e: int(e.vector_count))
            used = max(used, n)
    limit = max(1, -(-used // CHUNK)) * CHUNK
    return used, limit


@dataclass(eq=False)
class Conditioning:
    """One text's tensors, compared by identity: the same object means "nothing changed"."""

    context: torch.Tensor  # (1, tokens, width)
    pooled: torch.Tensor | None = None  # SDXL: (1, projection width)

    @property
    def tokens(self) -> int:
        return self.context.shape[1]

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // (CHUNK + 2)


class PromptEncoder:
    """Encodes prompts for one model, one job: clip skip, embeddings and emphasis are the job's own.

    ``encode_batch`` is one A1111 text-encoder call: all schedule texts of one prompt together.
    Results are cached by batch, so a prompt used twice (hires pass, AND parts) is encoded once.
    """

    def __init__(
        self,
        model: LoadedModel,
        clip_skip: int = 1,
        embeddings: Mapping[str, Any] | None = None,
        novelai_braces: bool = False,
        emphasis: str = "Original",
    ) -> None:
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, not {emphasis!r}")
        self.model = model
        self.novelai_braces = novelai_braces
        self.emphasis = emphasis
        self.clip_skip = max(1, clip_skip)
        self.embeddings = dict(embeddings or {})
        self.used_embeddings: dict[str, Any] = {}
        # A1111 notes a non-default emphasis in the infotext once a text with "(" or "[" is encoded.
        self.bracket_texts = False
        self._cache: dict[tuple[bool, tuple[str, ...]], list[Conditioning]] = {}
        self._encoders = encoder_keys(model.family)
        tok = model.tokenizers[self._encoders[0][0]]
        self._index = EmbeddingIndex(self.embeddings, tok) if self.embeddings else None

    def encode_batch(self, texts: Sequence[str], negative: bool = False) -> list[Conditioning]:
        """One Conditioning per text (repeated texts share one object), all with the same length.

        ``negative`` marks a negative prompt: for SDXL an all-empty one encodes to zeros (A1111).
        """
        key = (negative, tuple(texts))
        if key not in self._cache:
            self._cache[key] = self._encode_batch(list(texts), negative)
        return self._cache[key]

    def encode(self, text: str) -> Conditioning:
        return self.encode_batch([text])[0]

    def empty(self) -> Conditioning:
        """The empty prompt as a positive prompt (A1111's cond_stage_model_empty_prompt)."""
        return self.encode("")

    def _encode_batch(self, texts: list[str], negative: bool) -> list[Conditioning]:
        if any("(" in t or "[" in t for t in texts):
            self.bracket_texts = True
        distinct = list(dict.fromkeys(texts))
        counts = Counter(texts)
        # Each distinct text is run once; its weight in the batch mean is how often A1111 has it.
        weights = [counts[t] for t in distinct]
        zs, pooled = [], None
        for component, vec_key in self._encoders:
            tokenizer = self.model.tokenizers[component]
            encoder = self.model.text_encoders[component]
            chunked = [
                chunk_prompt(t, tokenizer, self._index, lambda e: int(e.vector_count), self.novelai_braces, self.emphasis)[0]
                for t in distinct
            ]
            z, p = self._run(encoder, tokenizer, chunked, weights, vec_key, component)
            zs.append(z)
            if p is not None:
                pooled = p
        context = torch.cat(zs, dim=-1) if len(zs) > 1 else zs[0]
        if negative and self.model.family is Family.SDXL and all(t == "" for t in texts):
            context = torch.zeros_like(context)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        by_text = {
            t: Conditioning(context[i : i + 1], None if pooled is None else pooled[i : i + 1]) for i, t in enumerate(distinct)
        }
        return [by_text[t] for t in texts]

    def _run(self, encoder: Any, tokenizer: Any, chunked: list[list[Chunk]], weights: list[int], vec_key: str,
             component: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(texts, chunks * 77, width) for a batch of texts; shorter ones end in empty chunks (A1111)."""
        outs, pooled = [], None
        for i in range(max(len(c) for c in chunked)):
            batch = [c[i] if i < len(c) else Chunk() for c in chunked]
            z, p = self._run_chunk(encoder, tokenizer, batch, weights, vec_key, component)
            outs.append(z)
            if i == 0:
                pooled = p  # SDXL's pooled output is the first chunk's
        return torch.cat(outs, dim=1), pooled

    def _run_chunk(self, encoder: Any, tokenizer: Any, batch: list[Chunk], weights: list[int], vec_key: str,
                   component: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.model.device
        pad = tokenizer.pad_token_id
        rows, mults = [], []
        for c in batch:
            n = CHUNK - len(c.tokens)
            rows.append([BOS_ID, *c.tokens, EOS_ID] + [pad] * n)  # SD2/SDXL-G pad with "!" after EOS
            mults.append([1.0, *c.multipliers, 1.0] + [1.0] * n)
        ids = torch.tensor(rows, device=dev)
        body = getattr(encoder, "text_model", encoder)
        fixes = [(row, pos, emb) for row, c in enumerate(batch) for pos, emb in c.fixes]
        hook = None
        if fixes:
            width = body.embeddings.token_embedding.weight.shape[1]

            def inject(_module: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                for row, pos, emb in fixes:
                    vec = emb.vector_for(width, vec_key)
                    n = min(out.shape[1] - pos - 1, vec.shape[0])
                    out[row, pos : pos + n] = vec[:n].to(out.device, out.dtype)
                    self.used_embeddings[emb.name] = emb
                return out

            hook = body.embeddings.token_embedding.register_forward_hook(inject)
        try:
            with torch.inference_mode():
                out = encoder(input_ids=ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        fam = self.model.family
        if fam is Family.SD1:
            z = out.last_hidden_state if self.clip_skip == 1 else body.final_layer_norm(out.hidden_states[-self.clip_skip])
        elif fam is Family.SD2:
            z = out.last_hidden_state  # its last built layer is the penultimate one; A1111 ignores clip skip
        else:
            z = out.hidden_states[-2]
        z = self._emphasize(z.float(), torch.tensor(mults, device=z.device, dtype=torch.float32), weights)
        pooled = out.text_embeds.float() if component == "text_encoder_2" else None
        return z, pooled

    def _emphasize(self, z: torch.Tensor, m: torch.Tensor, weights: list[int]) -> torch.Tensor:
        if self.emphasis in ("Ignore", "None") or bool(torch.all(m == 1)):
            return z
        w = torch.tensor(weights, device=z.device, dtype=torch.float64)

        def batch_mean(x: torch.Tensor) -> torch.Tensor:
            # The mean over A1111's whole batch tensor, where a text scheduled k times is k rows;
            # in float64, as the ratio of two means loses digits when they are small.
            return (x.double().mean(dim=(1, 2)) * w).sum() / w.sum()

        before = batch_mean(z)
        z = z * m[..., None]
        if self.emphasis == "Original":
            z = z * (before / batch_mean(z)).to(z.dtype)
        return z


def _repeat_last(c: Conditioning, tokens: int) -> Conditioning:
    """``c`` lengthened to ``tokens`` by repeating its last vector (A1111's stacking of AND parts)."""
    missing = tokens - c.tokens
    if missing <= 0:
        return c
    return Conditioning(torch.cat([c.context, c.context[:, -1:].repeat(1, missing, 1)], dim=1), c.pooled)


def _pad_empty(c: Conditioning, chunks: int, empty: Conditioning) -> Conditioning:
    """``c`` with ``chunks`` empty-prompt chunks appended (A1111's pad_cond_uncond)."""
    if chunks <= 0:
        return c
    return Conditioning(torch.cat([c.context, empty.context.repeat(1, chunks, 1)], dim=1), c.pooled)


@dataclass
class Schedule:
    """(last step index it applies to, conditioning) pairs; A1111 picks the first with step <= end."""

    entries: list[tuple[int, Conditioning]]

    def at(self, step: int) -> Conditioning:
        for end, cond in self.entries:
            if step <= end:
                return cond
        # Past the schedule's last step (DPM adaptive's extra calls, a hires pass longer than the
        # first) A1111 falls back to the first entry; do the same so its images can be reproduced.
        return self.entries[0][1]


@dataclass(eq=False)
class JobConditioning:
    """Everything the denoiser needs for a job's prompts: AND parts with weights, and the negative.

    ``pad_cond_uncond``/``pad_cond_uncond_v0`` are A1111's "Pad prompt/negative prompt" options
    (v0 wins when both are on, as in A1111). ``empty`` is needed only for ``pad_cond_uncond``.
    """

    parts: list[tuple[Schedule, float]]
    negative: Schedule
    empty: Conditioning | None = None
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    emphasis: str | None = None  # the infotext's "Emphasis" value, when A1111 writes one
    _memo: dict[tuple[int, ...], tuple[list[Conditioning], Conditioning]] = field(default_factory=dict, repr=False)

    def at(self, step: int) -> tuple[list[tuple[Conditioning, float]], Conditioning]:
        """``(parts, uncond)`` for a step index (A1111's denoiser step counter).

        All parts have the same length (shorter AND parts repeat their last vector). ``uncond``
        keeps its own length unless a padding option is on; then it has the parts' length.
        The same inputs give the same objects on every call, so ``is`` tells where they change.
        """
        conds = [s.at(step) for s, _ in self.parts]
        uncond = self.negative.at(step)
        key = (*(id(c) for c in conds), id(uncond))
        if key not in self._memo:
            self._memo[key] = self._combine(conds, uncond)
        parts, uncond = self._memo[key]
        return [(c, w) for c, (_, w) in zip(parts, self.parts, strict=True)], uncond

    def _combine(self, conds: list[Conditioning], uncond: Conditioning) -> tuple[list[Conditioning], Conditioning]:
        n = max(c.tokens for c in conds)
        conds = [_repeat_last(c, n) for c in conds]
        if self.pad_cond_uncond_v0:
            # The pre-1.6 DDIM padding: the negative repeats its last vector, or is cut short.
            if uncond.tokens < n:
                uncond = _repeat_last(uncond, n)
            elif uncond.tokens > n:
                uncond = Conditioning(uncond.context[:, :n], uncond.pooled)
        elif self.pad_cond_uncond:
            if self.empty is None:
                raise ValueError("pad_cond_uncond needs the empty prompt's conditioning")
            missing = (n - uncond.tokens) // (CHUNK + 2)
            if missing > 0:
                uncond = _pad_empty(uncond, missing, self.empty)
            elif missing < 0:
                conds = [_pad_empty(c, -missing, self.empty) for c in conds]
        return conds, uncond

    @property
    def padding(self) -> str | None:
        """"Pad conds" or "Pad conds v0" when a padding option changed a length, else None.

        Every text of a schedule has the same length, so this holds for every step.
        """
        conds, uncond = [s.at(0) for s, _ in self.parts], self.negative.at(0)
        if max(c.tokens for c in conds) == uncond.tokens:
            return None
        if self.pad_cond_uncond_v0:
            return "Pad conds v0"
        return "Pad conds" if self.pad_cond_uncond else None

    def infotext_params(self) -> dict[str, Any]:
        """The infotext keys this conditioning adds, as A1111 writes them ("Emphasis", "Pad conds")."""
        params: dict[str, Any] = {}
        if self.emphasis is not None:
            params["Emphasis"] = self.emphasis
        if self.padding is not None:
            params[self.padding] = True
        return params

    def change_steps(self, steps: int) -> set[int]:
        """Steps whose conditioning differs from the step before (for tests and previews)."""
        out = set()
        for s in range(1, steps):
            a, b = self.at(s - 1), self.at(s)
            if any(x is not y for (x, _), (y, _) in zip(a[0], b[0], strict=True)) or a[1] is not b[1]:
                out.add(s)
        return out


def job_conditioning(
    encoder: PromptEncoder,
    prompt: str,
    negative_prompt: str,
    steps: int,
    *,
    pad_cond_uncond: bool = False,
    pad_cond_uncond_v0: bool = False,
    base_steps: int | None = None,
) -> JobConditioning:
    """Schedules for a prompt (split on AND) and its negative prompt, as A1111 encodes them:
    each AND part's schedule texts in one batch, the negative prompt's in another. ``base_steps``:
    the schedules of a hires pass after a first pass of that many (prompt) steps."""

    def schedule(text: str, negative: bool = False) -> Schedule:
        entries = prompt_schedule(text, steps, base_steps)
        conds = encoder.encode_batch([t for _, t in entries], negative=negative)
        return Schedule([(end, c) for (end, _), c in zip(entries, conds, strict=True)])

    parts = [(schedule(text), weight) for text, weight in split_and(prompt)]
    negative = schedule(negative_prompt, negative=True)
    empty = encoder.empty() if pad_cond_uncond and not pad_cond_uncond_v0 else None
    emphasis = encoder.emphasis if encoder.emphasis != "Original" and encoder.bracket_texts else None
    return JobConditioning(parts, negative, empty, pad_cond_uncond, pad_cond_uncond_v0, emphasis)


def infotext_of(conds: Iterable[JobConditioning]) -> dict[str, Any]:
    """The conditioning keys of a job's infotext, over its passes (first pass, hires pass)."""
    params: dict[str, Any] = {}
    for c in conds:
        params.update(c.infotext_params())
    return params
