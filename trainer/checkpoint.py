"""The learner's full training state as named numpy arrays, and back.

What serving needs (rows, dense weights) is not enough to resume training exactly: the
sparse optimizers' per-row state, last-update steps, the dense optimizer's moments and the
step counters are needed too. They travel in the same binary payload format (never
pickle), as `train_snapshot` and `train_delta` payloads beside each version.

Names:  learner/<scalar>    dense/<param>    dense_opt/<param index>/<state name>
        table/<name>/<state_dict entry>   (snapshot: the table's whole state_dict)
        table/<name>/rows/keys|values|<row state>, table/<name>/tombstones, table/<name>/scalar/<name>  (delta)
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.learner import OnlineLearner


def learner_arrays(learner: OnlineLearner) -> dict[str, np.ndarray]:
    """Dense weights, dense optimizer state and counters (tables are added by the caller)."""
    out = {
        "learner/global_step": np.array(learner.global_step, dtype=np.int64),
        "learner/samples_seen": np.array(learner.samples_seen, dtype=np.int64),
    }
    out |= {f"dense/{k}": v.detach().numpy().copy() for k, v in learner.model.state_dict().items()}
    for index, state in learner.dense_optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"dense_opt/{index}/{name}"] = torch.as_tensor(value).detach().numpy().copy()
    return out


def load_learner_arrays(learner: OnlineLearner, arrays: dict[str, np.ndarray]) -> None:
    learner.global_step = int(arrays["learner/global_step"])
    learner.samples_seen = int(arrays["learner/samples_seen"])
    dense = {k[len("dense/"):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("dense/")}
    learner.model.load_state_dict(dense, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        if key.startswith("dense_opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
    groups = learner.dense_optimizer.state_dict()["param_groups"]  # hyper-parameters come from config
    learner.dense_optimizer.load_state_dict({"state": state, "param_groups": groups})


def table_snapshot_arrays(name: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One table's whole state_dict, named for the train snapshot."""
    return {f"table/{name}/{k}": v for k, v in state.items()}


def load_table_snapshot(learner: OnlineLearner, arrays: dict[str, np.ndarray]) -> None:
    for name, table in learner.sparse.tables.items():
        prefix = f"table/{name}/"
        table.load_state_dict({k[len(prefix):]: np.array(v) for k, v in arrays.items() if k.startswith(prefix)})


def table_delta_arrays(learner: OnlineLearner, name: str, keys: np.ndarray, values: np.ndarray,
                       tombstones: np.ndarray) -> dict[str, np.ndarray]:
    """The full state of one table's changed rows (the serving delta has only their values)."""
    table = learner.sparse.tables[name]
    out = {f"table/{name}/rows/keys": keys, f"table/{name}/rows/values": values,
           f"table/{name}/tombstones": tombstones}
    out |= {f"table/{name}/rows/{k}": v for k, v in table.row_state(keys).items()}
    out |= {f"table/{name}/scalar/{k}": v for k, v in table.scalars().items()}
    return out


def apply_table_delta(learner: OnlineLearner, arrays: dict[str, np.ndarray]) -> None:
    for name, table in learner.sparse.tables.items():
        rows = f"table/{name}/rows/"
        scalar = f"table/{name}/scalar/"
        row_state = {k[len(rows):]: v for k, v in arrays.items() if k.startswith(rows)}
        keys, values = row_state.pop("keys"), row_state.pop("values")
        table.apply_rows(keys, values, row_state, arrays[f"table/{name}/tombstones"],
                         {k[len(scalar):]: v for k, v in arrays.items() if k.startswith(scalar)})
