"""tools/synthesize.py: <QUE>/<ANS> parsing, chat templates, resumable output, Magpie and
Instruction Pre-Training end to end (a fake generator for the logic, a tiny random model for the
plumbing), and that tools/preprocess_data.py reads what they write."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import tiny_model_config
from data_common import mistral, mistral_args, run_cli, write_jsonl

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.instruction import augment_text, parse_messages, tokenize_conversation
from megatron_lite.data.tokenizers import bundled_mistral_tokenizer_path
from megatron_lite.synthesis import (
    cut_at_stops,
    encode_with_specials,
    load_template,
    normalize_text,
    parse_qa_pairs,
)
from megatron_lite.synthesis.output import OutputError, read_resumable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import synthesize  # noqa: E402


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- parsing (pure functions)


def test_parse_qa_pairs_hand_written_outputs():
    out = (
        "<QUE> What is the river called? <ANS> The Quiet river. </END>"
        "<QUE>  Where is it?\n<ANS>\nNorth.</END>\n"
        "<QUE> what is the river called <ANS> again </END>"  # duplicate question (normalized)
        "no tags at all </END>"
        "<QUE> empty answer <ANS>   </END>"
        "<QUE> two <ANS> answers <ANS> here </END>"
        "<QUE> cut off by the token limit <ANS> half an ans"
    )
    parsed = parse_qa_pairs(out)
    assert parsed.pairs == [
        {"prompt": "What is the river called?", "response": "The Quiet river."},
        {"prompt": "Where is it?", "response": "North."},
    ]
    assert (parsed.bad_segments, parsed.duplicates, parsed.unterminated) == (3, 1, True)
    assert parse_qa_pairs("<QUE> q <ANS> a </END>  \n").unterminated is False
    empty = parse_qa_pairs("random tokens from a random model")
    assert empty.pairs == [] and empty.unterminated and empty.bad_segments == 0


def test_cut_at_stops():
    assert cut_at_stops("How do rivers form? [/INST] They", ["</s>", "[/INST]"]) == (
        "How do rivers form? ",
        True,
    )
    assert cut_at_stops("a</s>b[/INST]", ["[/INST]", "</s>"]) == ("a", True)  # earliest stop wins
    assert cut_at_stops("no stop here", ["</s>"]) == ("no stop here", False)
    assert (
        normalize_text("  What IS\n the   river? ")
        == normalize_text("what is the river")
        == "what is the river"
    )
    assert normalize_text("What is the river?") != normalize_text("What is a river?")


# ---------------------------------------------------------------- chat templates


def test_builtin_templates_and_special_tokens():
    tok = mistral()
    ids = encode_with_specials(tok, "<s>[INST] hi [/INST]answer</s>")
    assert ids[0] == tok.bos and ids[-1] == tok.eod and tok.bos not in ids[1:] and tok.eod not in ids[:-1]
    assert tok.detokenize(ids) == "[INST] hi [/INST]answer"
    mistral_t, llama = load_template("mistral"), load_template("llama3")
    assert mistral_t.instruction_stops() == ["[/INST]", "</s>"]
    assert mistral_t.response_prompt("Q?") == "<s>[INST] Q? [/INST]"
    query = encode_with_specials(tok, mistral_t.query_prompt())
    assert query == encode_with_specials(tok, "<s>[INST] What?")[: len(query)]  # no lone "▁" token at the end
    assert llama.query_prompt().endswith("<|end_header_id|>\n\n")
    assert llama.pre_query.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert llama.end_of_turn == "<|eot_id|>" and "<|eot_id|>" in llama.instruction_stops()


def test_template_files(tmp_path):
    spec = {"pre_query": "<s>USER: ", "post_query": "\nASSISTANT:", "end_of_turn": "</s>"}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    (tmp_path / "t.yaml").write_text(
        "pre_query: '<s>USER: '\npost_query: \"\\nASSISTANT:\"\nend_of_turn: </s>\n"
    )
    for name in ("t.json", "t.yaml"):
        t = load_template(str(tmp_path / name))
        assert (t.pre_query, t.post_query, t.end_of_turn) == tuple(spec.values())
        assert t.instruction_stops() == ["ASSISTANT:", "</s>"]
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "post_query": 3}))
    with pytest.raises(ValueError, match="bad.json: chat template field 'post_query' must be a string"):
        load_template(str(tmp_path / "bad.json"))
    (tmp_path / "extra.json").write_text(json.dumps({**spec, "system": "x"}))
    with pytest.raises(ValueError, match=r"extra.json: unknown chat template field\(s\) \['system'\]"):
        load_template(str(tmp_path / "extra.json"))
    with pytest.raises(ValueError, match="'vicuna' is neither a built-in"):
        load_template("vicuna")


# ---------------------------------------------------------------- resumable output


def test_read_resumable_drops_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = '{"id": 0, "x": 1}\n{"id": 3, "x": 2}\n'
    path.write_text(good + '{"id": 4, "x": ')
    lines = []
    assert [r["id"] for r in read_resumable(str(path), lines.append)] == [0, 3]
    assert path.read_text() == good and "torn last line of 15 bytes" in lines[0]
    path.write_text(good + "garbage\n")  # a newline-terminated but unparsable last line is torn too
    assert len(read_resumable(str(path), lines.append)) == 2 and path.read_text() == good
    path.write_text('{"id": 0}\nnot json\n{"id": 1}\n')
    with pytest.raises(OutputError, match="out.jsonl:2: cannot resume"):
        read_resumable(str(path), lines.append)


# ---------------------------------------------------------------- fake generator (the test seam)


class FakeMagpieModel:
    """Deterministic in (prompt, seed): queries with duplicates, empties and over-long ones."""

    def __init__(self, tok, fail_after: int | None = None):
        self.tok, self.calls, self.fail_after = tok, 0, fail_after

    def __call__(self, prompts, seed, stops):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a kill between two generation calls
        rng = random.Random(seed)
        out = []
        for p in prompts:
            text = self.tok.detokenize(p)
            if text.endswith("[/INST]"):  # a response prompt: answer the query in it
                query = text[len("[INST] ") : -len(" [/INST]")]
                answer = f"Answer to {query}."
                out.append("" if "q7" in query else answer if "q8" in query else f"{answer}</s>[INST] junk")
            else:
                r = rng.randrange(12)
                canned = ["", "x" * 50 + " [/INST]", "q1 again? [/INST]", "q3 runs on and on"]
                out.append(canned[r] if r < 4 else f"q{r} question? [/INST] tail")
        return out


def magpie_argv(out, limit, *extra):
    return ["magpie", "--load", "unused", "--chat-template", "mistral", "--output", str(out)] + [
        "--limit", str(limit), "--batch-size", "4", "--seed", "5", "--max-instruction-chars", "40",
        "--log-interval", "0", *extra,
    ]  # fmt: skip


def test_magpie_fake_generator_counts_resume_and_preprocess(tmp_path, capsys):
    tok = mistral()
    ref = tmp_path / "ref.jsonl"
    assert synthesize.main(magpie_argv(ref, 6), FakeMagpieModel(tok), tok) == 0
    err = capsys.readouterr().err
    records = read_jsonl(ref)
    assert len(records) == 6 and [r["id"] for r in records] == sorted({r["id"] for r in records})
    prompts = [r["prompt"] for r in records]
    assert len({p.lower().rstrip("?") for p in prompts}) == 6  # exact de-dup on normalized text
    assert all(len(p) <= 40 and p.endswith("question?") or p == "q1 again?" for p in prompts)
    assert all(r["response"] == f"Answer to {r['prompt']}." for r in records)
    assert "q7 question?" not in prompts and "q8 question?" not in prompts  # empty, unfinished responses
    last = err.strip().splitlines()[-1]
    assert last.startswith("magpie: 6 records done (6 this run") and "duplicate instruction" in last
    for reason in ("instruction too long", "empty instruction", "empty response", "unfinished instruction"):
        assert reason in last
    assert "unfinished response" in last
    assert "skipped (empty instruction): attempt" in err  # malformed output gets its own line
    # only 7 distinct good queries exist: asking for 8 gives up after --max-attempts, and says so
    assert (
        synthesize.main(
            magpie_argv(tmp_path / "x.jsonl", 8, "--max-attempts", "40"), FakeMagpieModel(tok), tok
        )
        == 0
    )
    assert re.search(r"magpie: stopped after 40 attempts with \d of 8 records", capsys.readouterr().err)

    # killed after three generation calls, with a torn half line on disk: the restart continues
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(magpie_argv(part, 6), FakeMagpieModel(tok, fail_after=3), tok)
    n_before = len(read_jsonl(part))
    assert 0 < n_before < 6
    with open(part, "a") as f:
        f.write('{"id": 99, "prompt": "torn')
    assert synthesize.main(magpie_argv(part, 6), FakeMagpieModel(tok), tok) == 0
    err = capsys.readouterr().err
    assert "dropped a torn last line" in err and f"resuming after {n_before} records" in err
    assert part.read_text() == ref.read_text()  # same as the uninterrupted run
    assert f"6 records done ({6 - n_before} this run" in err.strip().splitlines()[-1]

    rc, err = run_cli(capsys, mistral_args(str(ref), tmp_path / "sft", "--instruction"))
    assert rc == 0, err
    tokens, masks = (
        IndexedDataset(str(tmp_path / "sft_text_document")),
        IndexedDataset(str(tmp_path / "sft_text_loss_mask")),
    )
    want = tokenize_conversation(tok, parse_messages(records[3], "x"))
    assert (
        len(tokens) == 6 and tokens[3].tolist() == want[0].tolist() and masks[3].tolist() == want[1].tolist()
    )


def fake_synthesizer(prompts, seed, stops, tok=None):
    """Hand-written synthesizer outputs chosen by the text in the prompt."""
    out = []
    for p in prompts:
        text = tok.detokenize(p)
        n = int(text.split("doc")[1].split()[0])
        if n % 4 == 3:
            out.append("the model rambles without any tags")
        else:
            out.append(
                "".join(
                    f"<QUE> Q{k} about doc{n}? <ANS> A{k} ({seed % 97}). </END>" for k in range(1 + n % 2)
                )
            )
    return out


def ipt_argv(inp, out, *extra):
    return ["instruction-pretraining", "--load", "unused", "--input", str(inp), "--output", str(out)] + [
        "--batch-size", "3", "--log-interval", "0", *extra,
    ]  # fmt: skip


def test_instruction_pretraining_fake_generator_counts_resume_and_preprocess(tmp_path, capsys):
    tok = mistral()
    lines = [{"text": f"Raw text of doc{n} about the river."} for n in range(10)]
    lines[5] = {"body": "no text field"}
    inp = write_jsonl(tmp_path / "corpus.jsonl", lines[:8] + ["{not json"] + lines[8:])

    def gen(prompts, seed, stops):
        assert all(tok.detokenize(p).lstrip().startswith("<CON> Raw text of doc") for p in prompts)
        assert all(p[0] == tok.bos for p in prompts)
        return fake_synthesizer(prompts, seed, stops, tok)

    ref = tmp_path / "ref.jsonl"
    assert synthesize.main(ipt_argv(inp, ref), gen, tok) == 0
    err = capsys.readouterr().err
    records = read_jsonl(ref)
    assert [r["id"] for r in records] == [0, 1, 2, 4, 6, 9, 10]  # 3, 7 malformed; 5, 8 bad input
    assert records[1]["text"] == lines[1]["text"] and len(records[1]["instruction_pairs"]) == 2
    assert records[0]["instruction_pairs"][0]["prompt"] == "Q0 about doc0?"
    assert "skipped (malformed): record 3 (" in err and "corpus.jsonl:4): no well-formed <QUE>" in err
    assert "corpus.jsonl:9): not JSON" in err and "corpus.jsonl:6): no non-empty string field 'text'" in err
    assert "7 records done" in err.splitlines()[-1] and "skipped 4 (bad input 2, malformed 2)" in err

    # --limit, then a restart without it (and a torn line) continues to the same output
    part = tmp_path / "part.jsonl"
    assert synthesize.main(ipt_argv(inp, part, "--limit", "5"), gen, tok) == 0
    assert [r["id"] for r in read_jsonl(part)] == [0, 1, 2, 4]
    with open(part, "a") as f:
        f.write('{"id": 6, "text": "Raw')
    assert synthesize.main(ipt_argv(inp, part), gen, tok) == 0
    err = capsys.readouterr().err
    assert part.read_text() == ref.read_text() and "resuming after input record 4" in err
    assert "skipped 3 (bad input 2, malformed 1)" in err.splitlines()[-1]  # each counted once

    custom = ["--prompt-template", "Passage {x}: {text}\nQuestions:", "--limit", "1"]
    seen = []
    assert (
        synthesize.main(
            ipt_argv(inp, tmp_path / "c.jsonl", *custom), lambda p, s, st: seen.extend(p) or [""], tok
        )
        == 0
    )
    assert [tok.detokenize(p) for p in seen] == ["Passage {x}: Raw text of doc0 about the river.\nQuestions:"]
    assert (
        synthesize.main(ipt_argv(inp, tmp_path / "d.jsonl", "--prompt-template", "no field"), gen, tok) == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: the synthesizer prompt template needs a {text} field")
    )

    rc, err = run_cli(capsys, mistral_args(str(ref), tmp_path / "aug", "--instruction-augmented"))
    assert rc == 0, err
    tokens = IndexedDataset(str(tmp_path / "aug_text_document"))
    assert len(tokens) == 7
    assert tokens[1].tolist() == tok.tokenize(augment_text(records[1], "x")) + [tok.eod]


# ---------------------------------------------------------------- a real (tiny, random) model


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random 2-layer Mistral over the bundled 32000-piece tokenizer, saved with its tokenizer
    (built and written by megatron_lite itself: importing transformers alone takes seconds)."""
    from megatron_lite.models import build_model
    from megatron_lite.models.hf_io import save_hf

    path = tmp_path_factory.mktemp("tiny_hf") / "model"
    cfg = tiny_model_config(
        vocab_size=32000, hidden_size=32, intermediate_size=64, max_position_embeddings=256
    )
    save_hf(build_model(cfg, seed=0).eval(), path)
    shutil.copy(bundled_mistral_tokenizer_path(), path / "tokenizer.model")
    return path


def test_real_tiny_model_plumbing(tiny_hf_dir, tmp_path, capsys):
    common = ["--load", str(tiny_hf_dir), "--max-new-tokens", "6", "--batch-size", "2", "--log-interval", "0"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    magpie = [
        "magpie",
        *common,
        "--chat-template",
        "mistral",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--keep-unfinished",
    ]
    assert synthesize.main([*magpie, "--output", str(full), "--limit", "3"]) == 0
    assert synthesize.main([*magpie, "--output", str(part), "--limit", "1"]) == 0
    assert synthesize.main([*magpie, "--output", str(part), "--limit", "3"]) == 0
    err = capsys.readouterr().err
    records = read_jsonl(full)
    assert len(records) == 3 and all(r["prompt"] and r["response"] for r in records)
    assert part.read_text() == full.read_text()  # seeded blocks: resuming repeats the real sampler too
    assert "magpie: 3 records done (2 this run" in err

    texts = ["The river runs north.", "river " * 300, "Data is quiet."]  # the 2nd does not fit the model
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "ipt.jsonl"
    argv = ["instruction-pretraining", *common, "--input", corpus, "--output", str(out)]
    assert synthesize.main(argv) == 0
    err = capsys.readouterr().err
    done = len(read_jsonl(out))  # a random model almost never closes a <QUE>/<ANS> pair
    assert f"{done} records done" in err and err.count("skipped (malformed)") == 2 - done
    assert "skipped (too long): record 1 (" in err and "tokens > 250" in err

    rc, err = run_cli(capsys, mistral_args(str(full), tmp_path / "sft", "--instruction"))
    assert rc == 0, err


def test_cli_errors_are_one_line(tiny_hf_dir, tmp_path, capsys):
    base = ["--output", str(tmp_path / "o.jsonl"), "--limit", "1"]
    assert synthesize.main(["magpie", "--load", str(tiny_hf_dir), "--chat-template", "nope", *base]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: chat template 'nope' is neither a built-in (mistral, llama3) nor a file"
    )
    assert synthesize.main(["magpie", "--load", str(tmp_path), "--chat-template", "mistral", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ")
        and "no tokenizer.json, tokenizer.model or training run config" in err
        and "\n" not in err
    )
    argv = [
        "magpie",
        "--load",
        str(tiny_hf_dir),
        "--chat-template",
        "mistral",
        "--max-new-tokens",
        "300",
        *base,
    ]
    assert synthesize.main(argv) == 2
    assert (
        "leaves no room for a prompt in the model's max_position_embeddings (256)" in capsys.readouterr().err
    )
    assert not (tmp_path / "o.jsonl").exists()  # nothing written before the model was checked


def test_model_generator_calls_the_batched_api(monkeypatch, tiny_hf_dir):
    """With ``inference.generate_batch`` present (p15-gen's API) it gets the stops and all EOS ids."""
    from megatron_lite import inference
    from megatron_lite.synthesis import SamplingOptions, model_text_generator

    tok, calls = mistral(), []

    def fake_batch(
        model, prompts, *, max_new_tokens, temperature, top_k, top_p, eos_id, stop_strings, decode, seed
    ):
        calls.append((max_new_tokens, temperature, top_p, eos_id, stop_strings, seed))
        assert decode([tok.bos, *tok.encode_raw("hi")]) == "hi"
        return [tok.encode_raw("A question? [/INST] more") + [7, 9], [tok.eod, 5]][: len(prompts)]

    monkeypatch.setattr(inference, "generate_batch", fake_batch, raising=False)
    model = inference.load_model_for_inference(tiny_hf_dir)
    gen = model_text_generator(model, tok, SamplingOptions(5, 0.7, 0.9), stop_ids=(7,))
    assert gen([[1, 2], [3]], 11, ["[/INST]"]) == ["A question? [/INST] more", ""]
    assert calls == [(5, 0.7, 0.9, [tok.eod, 7], ["[/INST]"], 11)]


def test_training_checkpoint_model_and_tokenizer(tmp_path, capsys):
    """--load of a training checkpoint (tp 2 here): the model via inference.loader, the tokenizer
    from the run's stored data config."""
    from megatron_lite.config import Config, DataConfig, ParallelConfig
    from megatron_lite.models import build_model
    from megatron_lite.training.convert import write_model_checkpoint

    model_cfg = tiny_model_config(vocab_size=32000, hidden_size=32, intermediate_size=64)
    cfg = Config(
        model=model_cfg,
        data=DataConfig(tokenizer_type="MistralTokenizer", tokenizer_model="bundled"),
        parallel=ParallelConfig(tensor=2),
    )
    write_model_checkpoint(build_model(model_cfg, seed=0).state_dict(), cfg, tmp_path / "ckpt")
    tok = synthesize.load_tokenizer(str(tmp_path / "ckpt"), None, None)
    assert type(tok).__name__ == "MistralTokenizer" and tok.vocab_size == 32000
    out = tmp_path / "o.jsonl"
    argv = ["magpie", "--load", str(tmp_path / "ckpt"), "--chat-template", "mistral", "--output", str(out)]
    assert synthesize.main([*argv, "--limit", "2", "--max-new-tokens", "4", "--keep-unfinished"]) == 0, (
        capsys.readouterr().err
    )
    assert len(read_jsonl(out)) == 2


def test_llama3_template_with_a_tokenizer_json(tmp_path):
    """Llama 3's header tokens become single ids (added special tokens of a tokenizer.json), and
    <|eot_id|> is a stop id: decoding would drop it, so generation is cut on the id."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "user", "assistant", "Hi", "there"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    raw.add_special_tokens([AddedToken(s, special=True) for s in specials])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = synthesize.load_tokenizer(str(tmp_path), None, None)
    bot, eot_text, sh, eh, eot = (raw.token_to_id(s) for s in specials)
    llama = load_template("llama3")
    assert encode_with_specials(tok, llama.query_prompt()) == [bot, sh, 1, eh]
    assert encode_with_specials(tok, llama.response_prompt("Hi there")) == [
        bot,
        sh,
        1,
        eh,
        3,
        4,
        eot,
        sh,
        2,
        eh,
    ]
    assert synthesize._stop_ids(tok, llama.instruction_stops() + llama.response_stops()) == (eot, sh, eot)
    assert tok.eod == eot_text
