"""--push-to-hub against a local stand-in for the Hub on 127.0.0.1 (HF_ENDPOINT), speaking the endpoints
huggingface_hub calls: repo creation, branch creation, preupload, the LFS batch API with a basic PUT upload, and
the commit.

The Xet upload protocol (binary chunked CAS) is not reasonable to stand in for, so the test turns it off
(HF_HUB_DISABLE_XET) and huggingface_hub uses its plain LFS path, which the Hub still serves.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lite_whisper.cli import convert_main
from lite_whisper.export import push_folder


class FakeHub:
    """Records what the client sends; answers like the Hub. Loopback only, stops with the test."""

    def __init__(self):
        self.requests = []
        self.created = []
        self.branches = []
        self.lfs_uploads = {}
        self.commits = []
        self.validated = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _json(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                url = f"http://127.0.0.1:{hub.port}"
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    name = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else payload["name"]
                    return self._json({"url": f"{url}/{name}", "name": name})
                if self.path == "/api/validate-yaml":
                    # the client checks README.md's metadata before committing it
                    hub.validated.append(json.loads(body))
                    return self._json({"errors": [], "warnings": []})
                if "/branch/" in self.path:
                    hub.branches.append(self.path.rsplit("/branch/", 1)[1])
                    return self._json({})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    # big files go through LFS (as on the Hub), small ones inline in the commit
                    return self._json({"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                         "shouldIgnore": False} for f in files]})
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    payload = json.loads(body)
                    objects = [{"oid": o["oid"], "size": o["size"],
                                "actions": {"upload": {"href": f"{url}/lfs-upload/{o['oid']}"}}}
                               for o in payload["objects"]]
                    return self._json({"transfer": "basic", "objects": objects})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    hub.commits.append({"path": self.path, "lines": lines})
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    return self._json({"commitUrl": f"{url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                       "pullRequestUrl": None})
                return self._json({"error": f"unexpected POST {self.path}"}, status=404)

            def do_PUT(self):
                body = self._body()
                hub.requests.append(("PUT", self.path, None))
                if self.path.startswith("/lfs-upload/"):
                    hub.lfs_uploads[self.path.rsplit("/", 1)[1]] = body
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._json({"error": "unexpected PUT"}, status=404)

            def do_GET(self):
                hub.requests.append(("GET", self.path, None))
                self._json({"error": f"unexpected GET {self.path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub() as hub:
        endpoint = f"http://127.0.0.1:{hub.port}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        # huggingface_hub reads these at import time; the test process imported it long before.
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_local_fake_hub")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub


def _folder(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "lite-whisper"}))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, goes through LFS
    return folder


def test_push_creates_repo_branch_and_uploads_every_file(fake_hub, tmp_path):
    folder = _folder(tmp_path)
    url = push_folder(folder, "someone/lite-whisper-test", private=True, revision="v1")
    assert "commit" in url

    assert len(fake_hub.created) == 1
    created = fake_hub.created[0]
    assert created["name"] == "lite-whisper-test" and created["organization"] == "someone"
    # older huggingface_hub sends "private": true, newer "visibility": "private"
    assert created.get("private") is True or created.get("visibility") == "private"
    assert fake_hub.branches == ["v1"]
    assert all(auth == "Bearer hf_test_token_for_the_local_fake_hub" for method, _, auth in fake_hub.requests
               if method == "POST")

    weights = (folder / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    assert fake_hub.lfs_uploads == {oid: weights}

    assert fake_hub.validated and "license: mit" in fake_hub.validated[0]["content"]
    (commit,) = fake_hub.commits
    assert commit["path"].endswith("/api/models/someone/lite-whisper-test/commit/v1")
    header = commit["lines"][0]
    assert header["key"] == "header" and "lite-whisper" in header["value"]["summary"].lower()
    files = {line["value"]["path"]: line for line in commit["lines"][1:]}
    assert set(files) == {"config.json", "README.md", "model.safetensors"}
    assert files["model.safetensors"]["key"] == "lfsFile" and files["model.safetensors"]["value"]["oid"] == oid
    config = files["config.json"]["value"]
    assert base64.b64decode(config["content"]) == (folder / "config.json").read_bytes()


def test_push_without_token_fails_before_converting(tmp_path, whisper_base_dir, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    output = tmp_path / "out"
    code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", str(output),
                         "--push-to-hub", "someone/repo"])
    assert code == 2
    assert "token" in capsys.readouterr().err
    assert not output.exists()


def test_invalid_repo_id_fails_before_converting(tmp_path, whisper_base_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", str(tmp_path / "out"),
                         "--push-to-hub", "not a/valid//id"])
    assert code == 2
    assert "invalid Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
