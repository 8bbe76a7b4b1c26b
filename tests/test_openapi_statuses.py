"""The OpenAPI document promises what the routes answer: every error provoked here, on each route, has its
status and its code in the document, route by route (test_protocol_errors checks that every route is in it)."""

from __future__ import annotations

from pathlib import Path

from fedscaled.server.openapi import openapi_document
from tests.daemon_proc import DaemonProcess, ctl
from tests.proto_client import ProtoClient, Reply
from tests.test_hardening import JOB, submit, token_of


def _documented(path: str, method: str) -> dict[str, str]:
    operation = openapi_document()["paths"][path][method]
    return {status: answer["description"] for status, answer in operation["responses"].items()}


def _check(path: str, method: str, reply: Reply) -> None:
    documented = _documented(path, method)
    status = str(reply.status)
    assert status in documented, f"{method.upper()} {path} answered {status} ({reply.error_code}), not documented"
    if reply.error_code is not None and reply.status >= 400:
        assert reply.error_code in documented[status], (
            f"{method.upper()} {path}: {status} {reply.error_code} not named in {documented[status]!r}")


def test_provoked_errors_are_documented_route_by_route(daemon: DaemonProcess, tmp_path: Path) -> None:
    client = ProtoClient(daemon.url)
    assert submit(daemon, tmp_path, JOB.format(name="doc")).returncode == 0
    token = token_of(daemon, "doc")
    enroll, checkin = "/v1/jobs/{job}/enroll", "/v1/jobs/{job}/checkin"
    model, models = "/v1/jobs/{job}/model", "/v1/jobs/{job}/models/{version}"
    artifact, artifact_file = "/v1/jobs/{job}/artifacts/{backend}", "/v1/jobs/{job}/artifacts/{backend}/{file}"
    frozen = "/v1/jobs/{job}/frozen"
    update, result = "/v1/jobs/{job}/tasks/{task_id}/update", "/v1/jobs/{job}/tasks/{task_id}/result"

    _check(enroll, "post", client.enroll("doc", "wrong"))  # 401
    _check(enroll, "post", client.enroll("nope", token))  # 404
    _check(enroll, "post", client.request("POST", "/v1/jobs/doc/enroll", b"{not json",
                                          headers={"Content-Type": "application/json"}))  # 400
    _check(enroll, "post", client.request("POST", "/v1/jobs/doc/enroll", b"x" * 200_000,
                                          headers={"Content-Type": "application/json"}))  # 413
    device = client.enroll("doc", token)
    _check(enroll, "post", device)  # 201
    bearer = str(device.body["token"])
    _check(checkin, "post", client.checkin("doc", "wrong"))  # 401
    _check(checkin, "post", client.post_json("/v1/jobs/doc/checkin", {"battery": "full"}, token=bearer))  # 400
    _check(model, "get", client.model_info("doc", "wrong"))  # 401
    _check(model, "get", client.model_info("doc", bearer))  # 200
    _check(models, "get", client.model("doc", bearer, "x1"))  # 400
    _check(models, "get", client.model("doc", bearer, 99))  # 404
    _check(artifact, "get", client.request("GET", "/v1/jobs/doc/artifacts/coreml", token=bearer))  # 404
    _check(artifact, "get", client.request("GET", "/v1/jobs/doc/artifacts/Bad%20Name", token=bearer))  # 400
    _check(artifact_file, "get", client.request("GET", "/v1/jobs/doc/artifacts/mnn/x.mnn", token=bearer))
    _check(frozen, "get", client.request("GET", "/v1/jobs/doc/frozen", token=bearer))  # 404: no frozen part
    _check(update, "put", client.upload("doc", bearer, "t-unknown", b"\x00" * 16))  # 404 unknown_task
    _check(update, "put", client.upload("doc", "wrong", "t-unknown", b"\x00" * 16))  # 401
    _check(result, "post", client.post_result("doc", bearer, "t-unknown", {"samples": 1}))  # 404
    _check(result, "post", client.request("POST", "/v1/jobs/doc/tasks/t-x/result", b"[]", token=bearer,
                                          headers={"Content-Type": "application/json"}))  # 400 or 404
    # A test task: a wrong-kind upload (409) and bad metadata (422).
    answer = client.checkin("doc", bearer).body
    assert answer["action"] == "test", answer
    task = answer["task"]["task_id"]
    _check(update, "put", client.upload("doc", bearer, task, b"\x00" * 16))  # 409 wrong_task_kind
    _check(result, "post", client.post_result("doc", bearer, task, {"samples": -1}))  # 422
    _check(result, "post", client.post_result("doc", bearer, task, {"samples": 2, "correct_top1": 1,
                                                                    "correct_top5": 1, "loss_sum": 1.0}))  # 200
    abandon = "/v1/jobs/{job}/tasks/{task_id}/abandon"
    given_up = client.request("POST", f"/v1/jobs/doc/tasks/{task}/abandon", token=bearer)
    _check(abandon, "post", given_up)  # 200, abandoned false: its result was delivered
    assert given_up.body == {"task_id": task, "abandoned": False, "reason": "result_delivered"}
    _check(abandon, "post", client.request("POST", "/v1/jobs/doc/tasks/t-unknown/abandon", token=bearer))  # 404
    _check(abandon, "post", client.request("POST", "/v1/jobs/doc/tasks/t-unknown/abandon", token="wrong"))  # 401
    # The job stopped: enroll answers 409 job_not_active.
    assert ctl(daemon.socket_path, "stop", "doc").returncode == 0
    _check(enroll, "post", client.enroll("doc", token))
    _check(abandon, "post", client.request("POST", f"/v1/jobs/doc/tasks/{task}/abandon", token=bearer))  # 409

