"""The prompts: synthetic contexts of an exact token count, the design's message builders
([A, B], [A, B, Q], [B, Q]), fresh queries that can never share a cached block, and one
config's prompts as token ids.
"""
import functools
import itertools
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .defaults import QUERY_TOKENS, TIER_CONDITION
from .errors import EXIT_USAGE, ExperimentError

Prompt = tuple[list[int], str | None]      # (token ids, cache_salt)


# Plain English words for the synthetic contexts (exact token counts come from generate_context).
WORDS = ("the cache model token prefix block query answer river stone light paper window market garden "
         "engine number signal letter memory system record table orange silver winter summer forest "
         "yellow planet music doctor school bridge travel dinner simple common public future").split()


def generate_context(target_tokens: int, label: str, tokenizer: Any) -> str:
    """Text that is exactly target_tokens tokens under tokenizer, distinct per label.

    Checked after a decode/encode round trip; raises if no cut gives an exact count.
    """
    rng = random.Random(f"context:{label}")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    text = f"{label}:"
    ids = encode(text)
    while len(ids) < target_tokens + 4:   # grow in shrinking steps: little overshoot
        text += " " + " ".join(rng.choice(WORDS) for _ in range((target_tokens + 4 - len(ids)) // 4 + 1))
        ids = encode(text)
    # Cutting at a token boundary and decoding usually round-trips; where BPE merges
    # differently at the cut, a neighbouring cut does.
    for cut in (target_tokens, target_tokens + 1, target_tokens - 1, target_tokens + 2, target_tokens - 2):
        if cut <= 0:
            continue
        candidate = tokenizer.decode(ids[:cut])
        if len(encode(candidate)) == target_tokens:
            return candidate
    raise ValueError(f"could not make a text of exactly {target_tokens} tokens for {label!r}")


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before every prompt (OPT: BOS </s>)."""
    plain = tokenizer.encode("cache", add_special_tokens=False)
    full = tokenizer.encode("cache", add_special_tokens=True)
    return list(full[: full.index(plain[0])]) if plain and plain[0] in full else []


def build_prompt_from_messages(messages: Iterable[Mapping[str, str]], tokenizer: Any) -> list[int]:
    """The prompt the engine gets: the special prefix, then each message's token ids in turn.
    Joined as ids, not as text, so no BPE merge can cross a message boundary and
    [A, B, Q] starts with exactly [A, B]'s ids."""
    ids = special_prefix_ids(tokenizer)
    for m in messages:
        ids += tokenizer.encode(m["content"], add_special_tokens=False)
    return ids


@functools.lru_cache(maxsize=4)
def query_head_words(tokenizer: Any) -> tuple[str, ...]:
    """Words that are one token at the start of a text: each query opens with a different one.
    A scan of the vocabulary, so cached: --sizes needs it once, not once per config."""
    words = []
    for token_id in range(min(len(tokenizer), 60000)):
        text = tokenizer.decode([token_id])
        if len(text) >= 3 and text.isascii() and text.isalpha() and \
                tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            words.append(text)
    return tuple(sorted(set(words)))


def query_stream(tokenizer: Any, shared_len: int, rng: random.Random) -> Iterator[str]:
    """Queries of QUERY_TOKENS tokens, without end, whose first shared_len tokens all differ.

    Q shares a KV block with [A, B]'s tail (shared_len of its tokens land there). Were
    that part ever the same twice, a hit could reuse the block an earlier request left
    behind and find more cached than [A, B]. So each query opens on its own word, or, once
    every word is used, on a word and a number no earlier query opened with."""
    words = list(query_head_words(tokenizer))
    rng.shuffle(words)
    heads, made = set(), 0
    for cycle in itertools.count():
        before = made
        for word in words:
            q = generate_context(QUERY_TOKENS, f"{word} {made}" if cycle == 0 else f"{word} {made} {cycle}", tokenizer)
            head = tuple(tokenizer.encode(q, add_special_tokens=False)[:shared_len])
            if head not in heads:
                heads.add(head)
                made += 1
                yield q
        if made == before:
            raise ExperimentError(f"the tokenizer has too few one-token words for more than {made} distinct "
                                  f"queries: use fewer rounds (--num-trials)")




def build_warmup_messages(context_a: str, context_b: str) -> list[dict[str, str]]:
    """[A, B]: generated once to populate the prefix cache."""
    return [{"role": "user", "content": context_a}, {"role": "user", "content": context_b}]


def build_hit_messages(context_a: str, context_b: str, query: str) -> list[dict[str, str]]:
    """[A, B, Q]: reuses the cached [A, B] prefix (also the cold prompt, salted)."""
    return build_warmup_messages(context_a, context_b) + [{"role": "user", "content": query}]


def build_miss_messages(context_b: str, query: str) -> list[dict[str, str]]:
    """[B, Q]: shares no prefix with [A, B]."""
    return [{"role": "user", "content": context_b}, {"role": "user", "content": query}]


class ConfigPrompts:
    """Step 2 for one (A, B) config: contexts A and B, the warmup prompt [A, B], and a prompt
    with a fresh query for every request, as (token ids, cache_salt)."""

    def __init__(self, tokenizer: Any, size_a: int, size_b: int, block: int, seed: int, run_id: str,
                 hit_salt: str | None = None):
        # hit_salt: the cache namespace of the warmup and the hits. None offline (the run starts
        # from an emptied cache); a server keeps other runs' blocks, so phase 1 gives each run its own.
        self.size_a, self.size_b, self.run_id, self.hit_salt = size_a, size_b, run_id, hit_salt
        # The labels name the config: the configs of one run share the engine's cache, and the
        # A of one must not be a prefix of another's.
        context_a = generate_context(size_a, f"Document A {size_a}x{size_b}", tokenizer)
        context_b = generate_context(size_b, f"Document B {size_a}x{size_b}", tokenizer)
        self.warmup_ids = build_prompt_from_messages(build_warmup_messages(context_a, context_b), tokenizer)
        self.miss_ids = build_prompt_from_messages([{"role": "user", "content": context_b}], tokenizer)
        shared_len = block - len(self.warmup_ids) % block      # Q's tokens in the block it shares with [A, B]
        self.queries = query_stream(tokenizer, shared_len, random.Random(f"{seed}:{size_a}:{size_b}"))
        self.tokenizer = tokenizer
        # prompt() joins ids itself, so that A and B are encoded once; it must give exactly
        # what the design's message builders give
        q = "a query"
        for messages, condition in ((build_hit_messages(context_a, context_b, q), "cache_hit"),
                                    (build_miss_messages(context_b, q), "cache_miss")):
            if build_prompt_from_messages(messages, tokenizer) != self.ids(condition, q):
                raise ExperimentError(f"internal error: the {condition} prompt differs from its message builder's")

    def prompt(self, condition: str, name: str) -> Prompt:
        """[A, B, Q] for hit, tier and cold, [B, Q] for miss, Q fresh. The ids are those of
        build_prompt_from_messages (the special prefix, then each message's ids), with A and B
        encoded once instead of per request. A salt puts a request in a cache namespace of its
        own: it can reuse nothing."""
        ids = self.ids(condition, next(self.queries))
        reuses = condition in ("cache_hit", TIER_CONDITION)        # [A, B] from HBM, or from the tier
        salt = self.hit_salt if reuses else f"{self.run_id}-{self.size_a}x{self.size_b}-{name}"
        return ids, salt

    def ids(self, condition: str, query: str) -> list[int]:
        q = self.tokenizer.encode(query, add_special_tokens=False)
        return (self.miss_ids if condition == "cache_miss" else self.warmup_ids) + q

    def trial_prompts(self, condition: str, r: int) -> tuple[Prompt, Prompt]:
        return self.prompt(condition, f"{condition}-{r}-ttft"), self.prompt(condition, f"{condition}-{r}-throughput")


def check_context_fits(configs: Iterable[tuple[int, int]], limit: int | None, prefix_tokens: int, max_output_tokens: int,
                       limit_text: str) -> None:
    """Every [prefix, A, B, Q] and its output must fit the context: exit 2, naming the first config
    that does not and the most A + B that would (limit_text: what holds the limit, and how much)."""
    fixed = prefix_tokens + QUERY_TOKENS + max_output_tokens
    for a, b in configs:
        need = fixed + a + b
        if limit and need > limit:
            room = limit - fixed
            raise ExperimentError(
                f"A={a} B={b} needs {need} tokens (prompt {need - max_output_tokens} + {max_output_tokens} output) "
                f"but {limit_text}: A + B must be at most {room}, e.g. --size-a {max(room - b, 1)} "
                f"--size-b {min(b, room - 1)}", EXIT_USAGE)
