"""A stand-in for torch.cuda on a CPU, enough to run mtbert.static_step's graphs path.

It models what the GPU review found (issue 18): a current device per process, streams that belong to
the device they were made on, a capture that works only on a stream of the step's device while that
device is current (otherwise the graph is empty and its replays do nothing), and a capture whose body
fails ends in capture_end's "previous error during capture". A capture records and runs nothing:
the step's state is restored at capture_end; a replay runs the recorded step on the CPU.
"""
from __future__ import annotations

import contextlib
import warnings

import torch



class FakeStream:
    def __init__(self, cuda: "FakeCuda", device=None):
        self.cuda = cuda
        self.device_index = cuda.index(device)
        cuda.streams.append(self.device_index)

    def wait_stream(self, other) -> None:
        pass


class FakeCuda:
    """Patches torch.cuda (via pytest's monkeypatch) and records where every CUDA call went."""

    def __init__(self, monkeypatch, stepper, target: int = 3, mode: str = "device"):
        # mode: "device" (a graph works when captured on the step's device), "empty" (every replay does
        # nothing, silently: a partial or empty graph), "fail" (the captured body raises)
        self.stepper, self.target, self.mode = stepper, target, mode
        self.current = 0
        self.stack: list[FakeStream] = []  # current-stream contexts entered and not exited
        self.streams: list[int] = []  # the device of every stream made
        self.captures: list[tuple[int, int]] = []  # (current device, capture stream's device) per capture
        self.synced: list[int] = []
        self.capturing = False
        self.last_body = None
        self.body = stepper._body
        cuda = self

        def body(width, counts):
            cuda.last_body = (width, counts)
            if cuda.capturing and cuda.mode == "fail":
                cuda.capture_error = True
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing "
                                   "(an allocation on another device)")
            cuda.body(width, counts)

        stepper._body = body
        stepper.graphs_on = True
        cpu = stepper.device
        begin = stepper.begin_epoch

        def begin_epoch(*args):  # the staging copy runs on the CPU; everything after it "on" cuda:target
            stepper.device = cpu
            begin(*args)
            stepper.device = torch.device("cuda", target)

        stepper.begin_epoch = begin_epoch

        class Graph(FakeGraph):
            fake = cuda

        @contextlib.contextmanager
        def device(d):
            before = cuda.current
            cuda.current = cuda.index(d)
            try:
                yield
            finally:
                cuda.current = before

        class stream:  # as torch.cuda.StreamContext: restores only when __exit__ is called (not on GC)
            def __init__(self, s):
                self.s = s

            def __enter__(self):
                self.before = cuda.current
                cuda.current = self.s.device_index  # StreamContext switches to the stream's device
                cuda.stack.append(self.s)

            def __exit__(self, *exc):
                cuda.stack.pop()
                cuda.current = self.before

        def current_stream(d=None):
            return cuda.stack[-1] if cuda.stack else FakeStream(cuda, d)

        def set_device(d):
            cuda.current = cuda.index(d)

        patches = {"Stream": lambda d=None: FakeStream(cuda, d), "stream": stream, "device": device,
                   "current_stream": current_stream, "current_device": lambda: cuda.current,
                   "set_device": set_device, "synchronize": lambda d=None: cuda.synced.append(cuda.index(d)),
                   "empty_cache": lambda: None, "CUDAGraph": Graph}
        for name, value in patches.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
        monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", None)

    def index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, FakeStream):
            return device.device_index
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.current if d.index is None else d.index

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes: parameters, gradients, optimizer state, counters, statistics."""
        s = self.stepper
        tensors = [p.data for p in s.model.parameters()]
        tensors += [p.grad for p in s.model.parameters() if p.grad is not None]
        tensors += [v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return tensors + [s.k, s.stats.loss_sum, s.stats.first_bad, *s.lrs]


class FakeGraph:
    fake: FakeCuda

    def __init__(self):
        self.replays, self.valid, self.out = 0, False, None

    def capture_begin(self, pool=None, capture_error_mode="global", check_input_liveness=False) -> None:
        cuda = self.fake
        stream = cuda.stack[-1].device_index if cuda.stack else cuda.current
        cuda.captures.append((cuda.current, stream))
        self.valid = cuda.current == cuda.target and stream == cuda.target and cuda.mode != "empty"
        self.saved = [t.clone() for t in cuda.state()]
        self.rng = torch.get_rng_state()
        cuda.capturing, cuda.capture_error = True, False

    def capture_end(self) -> None:
        cuda = self.fake
        cuda.capturing = False
        for t, saved in zip(cuda.state(), self.saved):  # a capture records, it does not run
            t.copy_(saved)
        torch.set_rng_state(self.rng)
        if cuda.capture_error:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.width, self.counts = cuda.last_body
        self.out = getattr(cuda.stepper, "loss", None)  # the step's loss tensor, where the code keeps it
        if not self.valid and cuda.mode == "device":
            warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be "
                          "captured on wrong device or stream.")

    def pool(self):
        return ("pool",)

    def replay(self) -> None:
        self.replays += 1
        if not self.valid:
            return  # an empty graph: nothing trains
        cuda = self.fake
        cuda.body(self.width, self.counts)
        if self.out is not None:
            self.out.copy_(cuda.stepper.loss)
