"""The fake server's Files and Batch APIs, driven through the real openai SDK."""

import json

import openai
import pytest


@pytest.fixture
def client(fake_api):
    with openai.OpenAI(base_url=fake_api.url + "/v1", api_key="test", max_retries=0) as c:
        yield c


def _chat_lines(n):
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(n)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _run(client, data, endpoint="/v1/chat/completions"):
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(data)
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h",
                                  metadata={"run": "r1"})
    seen = [batch.status]
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        batch = client.batches.retrieve(batch.id)
        seen.append(batch.status)
    return batch, seen


def _lines(client, file_id):
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines()]


def test_batch_walks_its_states_and_answers_every_line(client, fake_api):
    batch, seen = _run(client, _chat_lines(3))
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert batch.request_counts.total == 3 and batch.request_counts.completed == 3
    assert batch.metadata == {"run": "r1"} and batch.completed_at and batch.error_file_id is None
    out = _lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["row-0", "row-1", "row-2"]
    for line in out:
        body = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert line["response"]["status_code"] == 200 and body.usage.prompt_tokens == 2
        assert f"question {line['custom_id'][-1]}" in body.choices[0].message.content
    assert fake_api.stats()["batches_created"] == 1


def test_failed_and_refused_lines_go_to_the_error_file(client, fake_api):
    fake_api.configure(batch_line_fail=1.0)
    batch, _ = _run(client, _chat_lines(2))
    assert batch.request_counts.failed == 2 and batch.output_file_id is None
    errors = _lines(client, batch.error_file_id)
    assert {e["response"]["status_code"] for e in errors} == {500}
    fake_api.configure(batch_line_fail=0.0)
    data = "".join(json.dumps({"custom_id": "img", "method": "POST", "url": "/v1/images/generations",
                               "body": {"model": "gpt-image-1.5", "prompt": p}}) + "\n"
                   for p in ["[[refuse]]"]).encode()
    batch, _ = _run(client, data, "/v1/images/generations")
    error = _lines(client, batch.error_file_id)[0]
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "content_policy_violation"


def test_expired_batch_keeps_half_and_marks_the_rest(client, fake_api):
    fake_api.configure(batch_expire=1)
    batch, _ = _run(client, _chat_lines(4))
    assert batch.status == "expired" and batch.expired_at
    assert len(_lines(client, batch.output_file_id)) == 2
    assert [e["error"]["code"] for e in _lines(client, batch.error_file_id)] == ["batch_expired"] * 2


def test_cancel_and_list(client, fake_api):
    upload = client.files.create(file=("in.jsonl", _chat_lines(4)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    client.batches.retrieve(batch.id)  # in_progress
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "cancelled" and len(_lines(client, batch.output_file_id)) == 2
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    second = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    listed = [b.id for b in client.batches.list(limit=10)]
    assert set(listed) == {batch.id, second.id}


def test_invalid_input_fails_the_batch(client):
    batch, seen = _run(client, b'{"custom_id": "a"}\n')
    assert batch.status == "failed" and "needs custom_id" in batch.errors.data[0].message
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
