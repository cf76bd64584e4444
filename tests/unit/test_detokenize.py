import pytest

from kvmesh.gateway.detokenize import TextAssembler

pytestmark = pytest.mark.unit

TEXT = "The capital of France is Paris. It is lovely. Ünïcödé ✓ done"


def feed_one_by_one(assembler: TextAssembler, ids: list[int]) -> str:
    out = "".join(assembler.add([t]) for t in ids)
    return out + assembler.finish()


def test_incremental_equals_full_decode(backend_tokenizer) -> None:
    ids = backend_tokenizer.encode(TEXT, add_special_tokens=False).ids
    text = feed_one_by_one(TextAssembler(backend_tokenizer), ids)
    assert text == backend_tokenizer.decode(ids) == TEXT


def test_stop_string_truncates_and_never_leaks(backend_tokenizer) -> None:
    ids = backend_tokenizer.encode(TEXT, add_special_tokens=False).ids
    assembler = TextAssembler(backend_tokenizer, stop=["lovely", "Paris"])
    pieces = [assembler.add([t]) for t in ids]
    assert "".join(pieces) == "The capital of France is "
    assert assembler.stopped_by == "Paris"
    assert assembler.add(ids[:3]) == "" and assembler.finish() == ""


def test_stop_string_kept_when_asked(backend_tokenizer) -> None:
    ids = backend_tokenizer.encode(TEXT, add_special_tokens=False).ids
    assembler = TextAssembler(backend_tokenizer, stop=["France"], include_stop_str=True)
    assert feed_one_by_one(assembler, ids) == "The capital of France"


def test_held_back_tail_is_released_at_finish(backend_tokenizer) -> None:
    ids = backend_tokenizer.encode("abc xyz", add_special_tokens=False).ids
    assembler = TextAssembler(backend_tokenizer, stop=["not-there-at-all"])
    streamed = "".join(assembler.add([t]) for t in ids)
    assert len(streamed) < len("abc xyz")
    assert streamed + assembler.finish() == "abc xyz"


def test_special_tokens_are_skipped(backend_tokenizer) -> None:
    ids = backend_tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids
    assert feed_one_by_one(TextAssembler(backend_tokenizer), ids) == "hi"


def test_render_and_encode_gives_the_ids_transformers_gives(model_dir) -> None:
    """The ids from the Rust tokenizer directly are those transformers' ``encode``
    gives, with and without special tokens, one text or a batch; for the chat model and
    the embedding model (BERT's [CLS]/[SEP] come from the post-processor)."""
    from kvmesh.gateway.tokenizers import load_tokenizer
    from kvmesh.models.embedded import prepare_embedded_embedding_model

    texts = ["", TEXT, TEXT + "  double  spaces\n\tand <|im_end|> text", "é中文 🙂 [SEP]",
             " ".join(f"word{i}" for i in range(300))]  # longer than MiniLM's 128
    for folder in (model_dir, prepare_embedded_embedding_model()):
        # Ours first: transformers switches the Rust tokenizer's own truncation and
        # padding (tokenizer.json's) off in place when it is called.
        tokenizer = load_tokenizer(folder)
        ours = {special: ([tokenizer.encode(t, special) for t in texts],
                          tokenizer.encode_batch(texts, special)) for special in (False, True)}
        assert len(ours[True][0][-1]) > 300, folder  # neither truncated nor padded
        for special in (False, True):
            expected = [tokenizer.hf.encode(t, add_special_tokens=special) for t in texts]
            assert ours[special] == (expected, expected), folder
    tokenizer = load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": texts[2]}]
    text, ids = tokenizer.render_and_encode(messages, True)
    assert text == tokenizer.render_chat(messages, True)
    assert ids == tokenizer.hf.encode(text, add_special_tokens=False)


def test_prompts_sharing_long_prefixes_encode_to_the_same_ids_twice(model_dir) -> None:
    """The gateway's encoder remembers many more BPE words than tokenizers' default and
    skips offsets (``encode_batch_fast``); on vLLM's ``prefix_repetition`` prompts
    (random tokens, shared 2,048-token prefixes), first and again from its word cache,
    its ids are transformers' ids."""
    import random

    from kvmesh.bench.routing.workloads import prefix_repetition
    from kvmesh.gateway.tokenizers import ENCODER_CACHE_WORDS, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts = [tokenizer.decode(list(r.prompt))
             for r in prefix_repetition(random.Random(3), 24, 1.0, prefixes=4)]
    expected = [tokenizer.hf.encode(t, add_special_tokens=False) for t in texts]
    assert min(map(len, expected)) > 2000
    for _ in range(2):
        assert [tokenizer.encode(t, False) for t in texts] == expected
    assert tokenizer.encode_batch(texts, False) == expected
    assert ENCODER_CACHE_WORDS > 10_000  # tokenizers' own default
