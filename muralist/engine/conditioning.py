"""Text conditioning with A1111's semantics: prompts -> the tensors the UNet reads at each step.

- Chunks of 75 tokens (+BOS/EOS = 77): a prompt of any length is used whole, never truncated;
  ``BREAK`` starts a new chunk; a chunk that fills up within 20 tokens after a comma moves the
  words after the comma to the next chunk; an embedding is never split across chunks.
- Emphasis weights multiply each token's vector, then the chunk's mean is restored ("Original").
- Which hidden layer feeds the UNet follows A1111 per family: SD1 the last (or with clip skip N
  the N-th from last, then the final norm); SD2 the penultimate with the norm; SDXL both
  encoders' penultimate layers without the norm, concatenated, plus the second's pooled output.
- Prompt editing and alternation: every distinct text of a prompt's schedule is encoded once,
  and sampling switches tensors only at the steps where the schedule changes.
- ``AND`` splits the prompt into sub-prompts with weights (composable diffusion).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
) -> tuple[list[Chunk], int]:
    """Split one prompt into 75-token chunks with multipliers; also return A1111's token count."""
    parsed = parse_attention(text, novelai_braces)
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


@dataclass
class Conditioning:
    context: torch.Tensor  # (1, tokens, width)
    pooled: torch.Tensor | None = None  # SDXL: (1, projection width)

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // (CHUNK + 2)


class PromptEncoder:
    """Encodes prompts for one model, one job: clip skip and embeddings are the job's own.

    Results are cached by text, so a schedule's repeated texts and the empty prompt used for
    padding are encoded once.
    """

    def __init__(
        self,
        model: LoadedModel,
        clip_skip: int = 1,
        embeddings: Mapping[str, Any] | None = None,
        novelai_braces: bool = False,
    ) -> None:
        self.model = model
        self.novelai_braces = novelai_braces
        self.clip_skip = max(1, clip_skip)
        self.embeddings = dict(embeddings or {})
        self.used_embeddings: dict[str, Any] = {}
        self._cache: dict[str, Conditioning] = {}
        self._encoders = encoder_keys(model.family)
        tok = model.tokenizers[self._encoders[0][0]]
        self._index = EmbeddingIndex(self.embeddings, tok) if self.embeddings else None

    def encode(self, text: str) -> Conditioning:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def empty(self) -> Conditioning:
        return self.encode("")

    def _encode(self, text: str) -> Conditioning:
        zs, pooled = [], None
        for component, vec_key in self._encoders:
            tokenizer = self.model.tokenizers[component]
            encoder = self.model.text_encoders[component]
            chunks, _ = chunk_prompt(text, tokenizer, self._index, lambda e: int(e.vector_count), self.novelai_braces)
            z, p = self._run(encoder, tokenizer, chunks, vec_key, component)
            zs.append(z)
            if p is not None:
                pooled = p
        context = torch.cat(zs, dim=-1) if len(zs) > 1 else zs[0]
        return Conditioning(context, pooled)

    def _run(self, encoder: Any, tokenizer: Any, chunks: list[Chunk], vec_key: str, component: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.model.device
        pad = tokenizer.pad_token_id
        rows, mults = [], []
        for c in chunks:
            n = CHUNK - len(c.tokens)
            rows.append([BOS_ID, *c.tokens, EOS_ID] + [pad] * n)  # SD2/SDXL-G pad with "!" after EOS
            mults.append([1.0, *c.multipliers, 1.0] + [1.0] * n)
        ids = torch.tensor(rows, device=dev)
        body = getattr(encoder, "text_model", encoder)
        fixes = [(row, pos, emb) for row, c in enumerate(chunks) for pos, emb in c.fixes]
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
        z = z.float()
        m = torch.tensor(mults, device=z.device, dtype=z.dtype)
        if not torch.all(m == 1):
            before = z.mean(dim=(1, 2), keepdim=True)
            z = z * m[..., None]
            z = z * (before / z.mean(dim=(1, 2), keepdim=True))
        context = z.reshape(1, -1, z.shape[-1])  # chunks side by side on the token axis
        pooled = out.text_embeds[:1].float() if component == "text_encoder_2" else None
        return context, pooled


def pad_to(c: Conditioning, chunks: int, empty: Conditioning) -> Conditioning:
    """Append empty-prompt chunks until ``c`` has ``chunks`` chunks (A1111's pad_cond_uncond)."""
    missing = chunks - c.chunks
    if missing <= 0:
        return c
    return Conditioning(torch.cat([c.context, empty.context.repeat(1, missing, 1)], dim=1), c.pooled)


@dataclass
class Schedule:
    """(last step index it applies to, conditioning) pairs; A1111 picks the first with step <= end."""

    entries: list[tuple[int, Conditioning]]

    def at(self, step: int) -> Conditioning:
        for end, cond in self.entries:
            if step <= end:
                return cond
        return self.entries[-1][1]


@dataclass
class JobConditioning:
    """Everything the denoiser needs for a job's prompts: AND parts with weights, and the negative."""

    parts: list[tuple[Schedule, float]]
    negative: Schedule
    empty: Conditioning

    def at(self, step: int) -> tuple[list[tuple[Conditioning, float]], Conditioning]:
        conds = [(s.at(step), w) for s, w in self.parts]
        uncond = self.negative.at(step)
        n = max([c.chunks for c, _ in conds] + [uncond.chunks])
        return [(pad_to(c, n, self.empty), w) for c, w in conds], pad_to(uncond, n, self.empty)

    def change_steps(self, steps: int) -> set[int]:
        """Steps whose conditioning differs from the step before (for tests and previews)."""
        out = set()
        for s in range(1, steps):
            a, b = self.at(s - 1), self.at(s)
            if any(x is not y for (x, _), (y, _) in zip(a[0], b[0], strict=True)) or a[1] is not b[1]:
                out.add(s)
        return out


def job_conditioning(encoder: PromptEncoder, prompt: str, negative_prompt: str, steps: int) -> JobConditioning:
    """Schedules for a prompt (split on AND) and its negative prompt, each distinct text encoded once."""

    def schedule(text: str) -> Schedule:
        return Schedule([(end, encoder.encode(t)) for end, t in prompt_schedule(text, steps)])

    parts = [(schedule(text), weight) for text, weight in split_and(prompt)]
    return JobConditioning(parts, schedule(negative_prompt), encoder.empty())
