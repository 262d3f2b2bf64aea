"""The vLLM engine: the model_store checkpoint in vLLM's async engine, decoding inside the id trie.

vLLM has no trie-constrained beam search, so search runs the beam search here, one token
position per step: every live beam of every concurrent search becomes a one-token request
(prompt = query prompt + the beam's id tokens) for its best 2 x beams next tokens. The trie
itself runs inside vLLM's engine process (service.vllm_trie_mask.TrieLogitsProcessor): it
turns each such request's logits into the log-probabilities of the allowed next tokens and
-inf elsewhere, so an id outside the catalog cannot be produced, and a trie node of any width
(a million atomic ids at the root) is one request. All of a step's requests are in flight
together, so vLLM batches them, and prefix caching keeps the shared prompt from being recomputed.

Scores are log-probabilities over the whole vocabulary (the trie only masks), summed over the
id's tokens and its end token, plus the hubness prior's offsets when one is given, and the
beam bookkeeping follows transformers' beam search (2*beams candidates per step, finished ids
only from the top `beams`, stop when `beams` ids are finished), so both engines rank alike.

Prompts are token ids from genret.prompts (vLLM token prompts), exactly as in training.
A model trained with a query prefix (genret.model.QueryPrefix) starts its retrieve prompt
with soft tokens computed from the query's aligned embedding: those requests go to vLLM as
prompt embeddings (the soft tokens, then the LM's own embedding rows of the prompt's tokens),
which its prefix cache hashes like tokens.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import os
import uuid
from typing import NamedTuple

import torch
from genret.decoding import Answer, Hit, PriorWeights, search_prior
from genret.model_store import StoredModel
from genret.prompts import Prompts
from genret.trie import IdPrior, IdTrie

from .engine import EngineError, InputTooLong
from .settings import Settings


class VLLMEngine:
    name = "vllm"

    def __init__(self, stored: StoredModel, settings: Settings | None = None):
        self.stored = stored
        self.settings = settings or Settings()
        self.trie = stored.trie()
        self.prompts = Prompts(stored.load_tokenizer())
        self.end = stored.end_token
        # how long a description or answer may run: the setting, or the model's (its longest trained caption)
        self.answer_tokens = self.settings.max_answer_tokens or stored.answer_tokens
        if self.end != self.prompts.end:
            raise EngineError(f"{stored.path}: manifest end token {self.end} is not the tokenizer's eos {self.prompts.end}")
        # with a query prefix (loaded by start(), beside the engine): query texts -> soft tokens,
        # and the LM's token-embedding rows to spell the rest of the prompt
        self.query_soft_prefix = self.token_embeddings = None
        self._llm = None
        self._pending = 0
        self._catalog_priors: dict[PriorWeights, IdPrior | None] = {}  # for searches that leave some images out

    @property
    def queue_depth(self) -> int:
        return self._pending

    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        from .vllm_trie_mask import TrieLogitsProcessor

        s, cpu = self.settings, current_platform.is_cpu()
        return AsyncEngineArgs(
            model=str(self.stored.lm_path),
            dtype=s.dtype if s.dtype != "auto" else ("float32" if cpu else "bfloat16"),
            enforce_eager=s.enforce_eager if s.enforce_eager is not None else cpu,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=True,  # every beam step repeats the query prompt
            skip_tokenizer_init=True,
            enable_prompt_embeds=self.stored.uses_query_prefix,
            logits_processors=[TrieLogitsProcessor],
            # a step's top-N log-probs after the trie processor, which has put each allowed
            # token's log-probability (over the whole vocabulary) in its logit
            logprobs_mode="processed_logits",
            max_logprobs=2 * max(s.beams, s.max_k, s.rerank_beams, self.stored.ask_descriptions),
            disable_log_stats=True,
            seed=0,
        )

    async def start(self) -> None:
        if self._llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        # Building the engine blocks for a minute (it starts the engine-core process and loads
        # the weights, and the query prefix's): do it on a thread so the event loop keeps answering /healthz.
        # (The engine goes into `built`, not the future's result, which asyncio keeps referenced.)
        use_model_runner_v1()
        args, built = self.engine_args(), []

        def build():
            if self.stored.uses_query_prefix:
                self.query_soft_prefix = self.stored.load_query_soft_prefix()
                self.token_embeddings = _input_embeddings(self.stored)
            built.append(AsyncLLM.from_engine_args(args))

        building = asyncio.get_running_loop().run_in_executor(None, build)
        try:
            await asyncio.shield(building)
        except asyncio.CancelledError:  # shut down while loading: stop the engine once it exists
            building.add_done_callback(lambda _: built and built.pop().shutdown())
            raise
        self._llm = built.pop()

    def failure(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return f"the vLLM engine died: {self._llm.dead_error}"
        return None

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()  # AsyncLLM sits in reference cycles; collected at exit, its __del__ fails noisily

    async def _generate(self, prompt: list[int], params, soft_prefix=None):
        """One request; `soft_prefix` (n, dim) puts soft tokens in front of the prompt's tokens."""
        from vllm.exceptions import VLLMClientError, VLLMServerError
        from vllm.inputs import embeds_input, tokens_input

        if self._llm is None:
            raise EngineError("the vLLM engine is not loaded")
        if failure := self.failure():
            raise EngineError(failure)
        self._pending += 1
        try:
            final = None
            # Engine inputs (token ids, or embeddings): vLLM neither tokenizes nor renders anything.
            if soft_prefix is None:
                engine_input = tokens_input(prompt)
            else:
                engine_input = embeds_input(torch.cat([soft_prefix, self.token_embeddings[prompt]]))
            async for out in self._llm.generate(engine_input, params, request_id=uuid.uuid4().hex):
                final = out
            return final.outputs[0]
        except VLLMClientError as e:  # our prompts are checked first; this would be a bug of ours
            raise EngineError(f"vLLM rejected the request: {e}") from e
        except VLLMServerError as e:
            raise EngineError(f"vLLM failed: {type(e).__name__}: {e}") from e
        finally:
            self._pending -= 1

    def _check_fits(self, prompt: list[int], new_tokens: int, soft_tokens: int = 0) -> None:
        length = soft_tokens + len(prompt)
        if length + new_tokens > self.settings.max_model_len:
            raise InputTooLong(f"the prompt is {length} tokens; with {new_tokens} to generate it exceeds "
                               f"the engine's max_model_len={self.settings.max_model_len}")

    async def best_next(self, prompt: list[int], prefix: tuple[int, ...], n: int, prior: PriorWeights,
                        soft_prefix=None, restricted: Restriction | None = None) -> dict[int, float]:
        """The n best allowed next tokens after [soft prefix] + prompt + the id `prefix`, each with its
        log-probability (plus the prior's step offset). `restricted`: the images a search may return
        (within some, or all but some), which decide the tokens allowed and their offsets."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=n, detokenize=False,
                                extra_args=_step(prefix, prior, restricted))
        [position] = (await self._generate(prompt + list(prefix), params, soft_prefix)).logprobs
        return {t: p.logprob for t, p in position.items() if p.logprob != float("-inf")}

    async def _query_soft_prefix(self, query: str):
        """The query prefix's soft tokens for this query, or None for a text-only model."""
        if self.query_soft_prefix is None:
            return None
        # MiniLM on the CPU takes milliseconds per query: off the event loop all the same
        return await asyncio.to_thread(lambda: self.query_soft_prefix([query])[0])

    async def next_logprobs(self, prompt: list[int], n: int) -> dict[int, float]:
        """The n likeliest next tokens after the prompt, with their log-probabilities (the engine's
        logprobs are read after the processors, and without LOGPROBS they would be raw logits)."""
        from vllm import SamplingParams

        from .vllm_trie_mask import LOGPROBS

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=n, detokenize=False, extra_args={LOGPROBS: True})
        [position] = (await self._generate(prompt, params)).logprobs
        return {t: p.logprob for t, p in position.items()}

    async def beam_search(self, beams: int, steps: int, best_next) -> list[tuple[float, tuple[int, ...]]]:
        """The `beams` best (score, tokens) sequences, best first, each finished by the end token or
        by the last step; `best_next(tokens so far)` gives a beam's 2 x beams best next tokens and
        their log-probabilities. Each step's requests are all in flight together."""
        running: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        finished: list[tuple[float, tuple[int, ...]]] = []
        for step in range(steps):
            nexts = await asyncio.gather(*(best_next(seq) for _, seq in running))
            candidates = heapq.nlargest(2 * beams, ((score + lp, seq + (t,)) for (score, seq), lps in zip(running, nexts)
                                                    for t, lp in lps.items()), key=lambda c: c[0])
            running = []
            for rank, (score, seq) in enumerate(candidates):
                if seq[-1] == self.end or step == steps - 1:  # as transformers, which stops at max_new_tokens
                    if rank < beams:
                        finished.append((score, seq))
                elif len(running) < beams:
                    running.append((score, seq))
            finished = heapq.nlargest(beams, finished, key=lambda c: c[0])
            if len(finished) >= beams or not running:
                break
        return finished

    async def search(self, query: str, k: int, beams: int, prior: PriorWeights = PriorWeights(),
                     within: frozenset[str] | None = None, exclude: frozenset[str] | None = None) -> list[Hit]:
        prior.check(self.stored)  # here, not in vLLM's worker
        # the worker knows the catalog's trie alone: a restricted search's steps say what differs from it
        restricted = None
        if within is not None or exclude:
            restricted = await asyncio.to_thread(self._restriction, within, exclude, prior)
        trie = self.trie if restricted is None else restricted.trie
        prompt = self.prompts.retrieve(query)
        soft = await self._query_soft_prefix(query)
        self._check_fits(prompt, trie.max_depth(), 0 if soft is None else len(soft))
        k = min(k, len(trie))
        beams = max(beams, k)
        finished = await self.beam_search(beams, trie.max_depth(), lambda seq: self.best_next(
            prompt, seq, min(2 * beams, len(trie.allowed_next(seq))), prior, soft, restricted))
        hits = [Hit(trie.key_for(seq), score) for score, seq in finished]
        assert all(h.key is not None for h in hits), "a finished beam left the trie"
        return hits[:k]

    def _restriction(self, within: frozenset[str] | None, exclude: frozenset[str] | None,
                     prior: PriorWeights) -> Restriction | None:
        """The trie of the images a search may return and the prior over it, as the transformers
        engine searches them (None: the whole catalog after all)."""
        trie = self.stored.trie(within, exclude)
        if trie is self.trie:
            return None
        if trie.base is None:  # within some images: few, so their prior is computed for them alone
            return Restriction(trie, search_prior(self.stored, prior, trie), frozenset())
        catalog_prior = self._catalog_priors.get(prior)
        if prior not in self._catalog_priors:
            catalog_prior = self._catalog_priors[prior] = search_prior(self.stored, prior, self.trie)
        over = None if catalog_prior is None else catalog_prior.over(trie)
        return Restriction(trie, over, frozenset(p[:-1] for p in trie.copied if p))

    async def _greedy(self, prompt: list[int], scored: list[int] | None = None):
        """The greedy continuation's text, and vLLM's output: with `scored` tokens, each step's
        logprobs hold theirs, as logits (the trie processor leaves these requests as they are)."""
        from vllm import SamplingParams

        n = self.answer_tokens
        self._check_fits(prompt, n)
        params = SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=[self.end], detokenize=False,
                                logprob_token_ids=scored)
        out = await self._generate(prompt, params)
        text = self.prompts.decode_answer([t for t in out.token_ids if t != self.end])
        return text, out

    async def describe(self, key: str) -> str:
        text, _ = await self._greedy(self.prompts.describe(self.stored.id_tokens[key]))
        return text

    async def descriptions(self, key: str, n: int) -> list[str]:
        """The image's n best descriptions by beam search, best first, each text once (as
        genret.decoding.TransformersEngine.generate_beams). One is the greedy description, which
        one request finds (a beam search asks once a token)."""
        if n == 1:
            return [text] if (text := await self.describe(key)) else []
        prompt, steps = self.prompts.describe(self.stored.id_tokens[key]), self.answer_tokens
        self._check_fits(prompt, steps)
        finished = await self.beam_search(n, steps, lambda seq: self.next_logprobs(prompt + list(seq), 2 * n))
        texts = [self.prompts.decode_answer([t for t in seq if t != self.end]) for _, seq in finished]
        return list(dict.fromkeys(t for t in texts if t))

    async def ask(self, key: str, question: str) -> Answer:
        context = None  # as genret.decoding.TransformersEngine.ask_contexts
        if self.stored.asks_from_description:
            context = " ".join(await self.descriptions(key, self.stored.ask_descriptions))
        yes, no = self.prompts.yes_no_tokens
        text, out = await self._greedy(self.prompts.ask(self.stored.id_tokens[key], question, context), [yes, no])
        first = out.logprobs[0]  # logits (logprobs_mode="processed_logits"): their difference is the log-odds
        return Answer(text, first[yes].logprob - first[no].logprob)


class Restriction(NamedTuple):
    """A search's own trie (within some images, or the catalog less some: IdTrie.without), the prior
    over it, and for the latter the prefixes whose nodes have a copied child (their offsets may differ)."""

    trie: IdTrie
    prior: IdPrior | None
    copied_parents: frozenset[tuple[int, ...]]


def _step(prefix: tuple[int, ...], prior: PriorWeights, restricted: Restriction | None) -> dict:
    """The step's extra_args for vLLM's worker, which holds the catalog's trie and its prior alone.
    Within some images a step names the tokens their trie allows and their offsets. The catalog
    less some images differs from the catalog's trie only on the copied nodes of their paths; there
    a step names the tokens that lead to left-out images alone, unless the prior's offsets differ
    there too (a node below the root, or a root with a copied child: then what it allows, as within)."""
    from .vllm_trie_mask import step_args

    if restricted is None:
        return step_args(prefix, prior)
    trie, over, copied_parents = restricted
    if trie.base is None:
        return step_args(prefix, prior, trie.allowed_next(prefix), over and over.step_offsets(prefix))
    if prefix not in trie.copied:  # the catalog's own node
        return step_args(prefix, prior)
    if over is None or (not prefix and prefix not in copied_parents):
        return step_args(prefix, prior, forbidden=trie.removed.get(prefix, []))
    return step_args(prefix, prior, trie.allowed_next(prefix), over.step_offsets(prefix))


def use_model_runner_v1() -> None:
    """The trie processor implements vLLM's V1 logits-processor interface, the one vLLM's CPU
    runner calls and the tests run. On a GPU vLLM 0.32 picks its Model Runner V2 where Triton
    is installed, and that runner refuses V1 processors at start; this keeps the V1 runner
    there too (the engine process inherits the environment)."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def _input_embeddings(stored: StoredModel) -> torch.Tensor:
    """The LM's token-embedding rows (to spell a prompt as embeddings), read from its checkpoint."""
    from safetensors import safe_open

    for path in sorted(stored.lm_path.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                return f.get_tensor("model.embed_tokens.weight").float()
    raise EngineError(f"{stored.lm_path}: no model.embed_tokens.weight in its safetensors")
