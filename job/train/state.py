"""What survives a restart besides weights and optimizer: counters and RNG streams."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class TrainState:
    """Loop counters; the data position is (epoch, batch_in_epoch)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0
    best_loss: float | None = None
    last_loss: float | None = None
    # Processes the run had when the state was saved; resuming on another count reshards.
    world_size: int = 1

    def state_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore counters."""
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class RandomStreams:
    """Every random stream the loop draws from, each seeded from the job seed.

    Separate streams keep a change in one consumer (say, caption dropout turned on)
    from shifting the noise every other step sees.
    """

    noise: torch.Generator
    dropout: torch.Generator

    @classmethod
    def seeded(cls, seed: int) -> "RandomStreams":
        """Fresh streams for a new run."""
        return cls(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))

    def state_dict(self) -> dict:
        """Generator states plus torch's global CPU/CUDA states (LoRA dropout uses those)."""
        state = {"noise": self.noise.get_state(), "dropout": self.dropout.get_state(),
                 "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["torch_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore every stream."""
        self.noise.set_state(state["noise"])
        self.dropout.set_state(state["dropout"])
        torch.set_rng_state(state["torch_cpu"])
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])
