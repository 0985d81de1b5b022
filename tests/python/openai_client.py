"""Drives loraforge's OpenAI-compatible API with the official `openai` SDK, as a user's script
would after changing the base URL. Run by tests/tests/openai_api.rs against a live control plane:
  LORAFORGE_OPENAI_BASE_URL  the server's /v1 URL
  LORAFORGE_API_KEY          a key with the submit scope
  LORAFORGE_MODEL            a registered base model's name
  LORAFORGE_TRAIN_FILE       a JSONL training file
Each step asserts; the last line printed is a JSON summary the Rust test checks further.
"""

import io
import json
import os
import sys
import time

import openai
from openai import OpenAI

BASE_URL = os.environ["LORAFORGE_OPENAI_BASE_URL"]
MODEL = os.environ["LORAFORGE_MODEL"]
TRAIN_FILE = os.environ["LORAFORGE_TRAIN_FILE"]
TIMEOUT_S = 300

client = OpenAI(base_url=BASE_URL, api_key=os.environ["LORAFORGE_API_KEY"], max_retries=0)


def step(message):
    print(f"openai_client: {message}", file=sys.stderr, flush=True)


def error_of(exc):
    """The `error` object of an OpenAI-shaped error answer."""
    body = exc.response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def expect_error(kind, status, call):
    try:
        call()
    except kind as exc:
        assert exc.status_code == status, (exc.status_code, exc.response.text)
        return error_of(exc)
    raise AssertionError(f"expected {kind.__name__}")


def wait(job_id, done=("succeeded", "failed", "cancelled")):
    start = time.monotonic()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in done and job.to_dict()["loraforge"]["status"] in done:
            return job
        assert time.monotonic() - start < TIMEOUT_S, f"{job_id} still {job.status}"
        time.sleep(0.5)


# --- Files ------------------------------------------------------------------------------------
step("upload a training file")
with open(TRAIN_FILE, "rb") as f:
    uploaded = client.files.create(file=f, purpose="fine-tune")
assert uploaded.id.startswith("file-train-"), uploaded
assert uploaded.object == "file" and uploaded.purpose == "fine-tune", uploaded
assert uploaded.status == "processed", uploaded
assert uploaded.bytes == os.path.getsize(TRAIN_FILE), uploaded
assert client.files.retrieve(uploaded.id).id == uploaded.id
# The same content again is the same file.
with open(TRAIN_FILE, "rb") as f:
    assert client.files.create(file=f, purpose="fine-tune").id == uploaded.id
with open(TRAIN_FILE, "rb") as f:
    assert client.files.content(uploaded.id).read() == f.read()
second = client.files.create(
    file=("second.jsonl", io.BytesIO(b'{"prompt": "2+2=", "completion": "4"}\n')),
    purpose="fine-tune",
)
files = list(client.files.list(limit=1))
assert [f.id for f in files] == [second.id, uploaded.id], [f.id for f in files]

step("a bad file is refused with its line numbers")
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.files.create(
        file=("bad.jsonl", io.BytesIO(b'{"text": "fine"}\n{"prompt": "no completion"}\nnot json\n')),
        purpose="fine-tune",
    ),
)
assert error["type"] == "invalid_request_error" and error["param"] == "file", error
assert "line 2" in error["message"] and "line 3" in error["message"], error
assert "line 1" not in error["message"], error
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.files.create(file=("x.jsonl", io.BytesIO(b'{"text": "a"}\n')), purpose="batch"),
)
assert error["param"] == "purpose", error

# --- Errors a newcomer hits ------------------------------------------------------------------
step("an unknown model names the registered ones")
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=uploaded.id),
)
assert error["param"] == "model", error
assert MODEL in error["message"], error
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.fine_tuning.jobs.create(model=MODEL, training_file="file-nope"),
)
assert error["param"] == "training_file", error
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.fine_tuning.jobs.create(
        model=MODEL, training_file=uploaded.id, hyperparameters={"batch_size": 0}
    ),
)
assert error["param"] == "hyperparameters.batch_size", error
error = expect_error(
    openai.BadRequestError,
    400,
    lambda: client.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, method={"type": "dpo"}),
)
assert error["param"] == "method.type", error
error = expect_error(openai.NotFoundError, 404, lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"))
assert error["type"] == "invalid_request_error", error

# --- A job, to success ---------------------------------------------------------------------
step("create a job and poll it to success")
job = client.fine_tuning.jobs.create(
    model=MODEL,
    training_file=uploaded.id,
    suffix="oa-demo",
    seed=7,
    method={
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 4, "learning_rate_multiplier": 5}},
    },
    extra_body={
        "loraforge": {
            "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 12, "seq_len": 64, "checkpoint_every": 4},
        }
    },
)
assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job", job
assert job.status in ("queued", "running"), job
assert job.model == MODEL and job.training_file == uploaded.id, job
assert job.hyperparameters.batch_size == 4 and job.hyperparameters.n_epochs == 50, job
assert abs(job.hyperparameters.learning_rate_multiplier - 5) < 1e-9, job
assert job.seed == 7 and job.method.type == "supervised", job
done = wait(job.id)
assert done.status == "succeeded", done
assert done.fine_tuned_model == "oa-demo@1", done
assert done.finished_at is not None and done.error is None, done
assert done.to_dict()["loraforge"]["method"] == "lora", done

step("list its events, newest first, across pages")
first_page = client.fine_tuning.jobs.list_events(job.id, limit=5)
assert len(first_page.data) == 5 and first_page.has_more, first_page
events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))
seqs = [int(e.id.removeprefix("ftevent-")) for e in events]
assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs), seqs
assert all(e.object == "fine_tuning.job.event" for e in events)
assert events[0].message == "The job has successfully completed", events[0]
metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
assert len(metrics) == 12, [e.message for e in events]
assert events[-1].message.startswith("Job queued"), events[-1]

step("list its checkpoints, one a page")
checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
steps = [c.step_number for c in checkpoints]
assert steps[:2] == [8, 4] or steps[:3] == [12, 8, 4], steps
for c in checkpoints:
    assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == job.id, c
    assert c.metrics.step == c.step_number and c.metrics.train_loss is not None, c
    assert c.fine_tuned_model_checkpoint.endswith(f"/{c.step_number:09}"), c

# --- Another job, cancelled ----------------------------------------------------------------
step("cancel another job")
other = client.fine_tuning.jobs.create(
    model=MODEL,
    training_file=uploaded.id,
    extra_body={"loraforge": {"training": {"max_steps": 100000, "seq_len": 64}}},
)
assert other.hyperparameters.n_epochs is None, other
cancelled = client.fine_tuning.jobs.cancel(other.id)
assert cancelled.id == other.id and cancelled.status == "cancelled", cancelled
cancelled = wait(other.id)
assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None, cancelled
error = expect_error(openai.ConflictError, 409, lambda: client.fine_tuning.jobs.cancel(other.id))
assert error["code"] == "job_finished", error

step("list jobs, one a page")
jobs = list(client.fine_tuning.jobs.list(limit=1))
assert [j.id for j in jobs] == [other.id, job.id], [j.id for j in jobs]

step("a wrong key is refused in OpenAI's shape")
bad = OpenAI(base_url=BASE_URL, api_key="lf_wrong", max_retries=0)
error = expect_error(openai.AuthenticationError, 401, lambda: bad.fine_tuning.jobs.list())
assert error["code"] == "invalid_api_key", error

print(
    json.dumps(
        {
            "file": uploaded.id,
            "job": job.id,
            "fine_tuned_model": done.fine_tuned_model,
            "cancelled": other.id,
            "events": len(events),
            "checkpoints": steps,
        }
    )
)
