"""Real-classifier experiment: simplex ensemble weights over scikit-learn models.

Five classifiers of mixed quality (logistic regression, k-nearest neighbours, a
small MLP, Gaussian naive Bayes and a shallow decision tree) are trained on the
digits data set that ships inside scikit-learn (nothing is downloaded). A
``sumto.WeightedSum`` with simplex weights mixes their predicted class
probabilities; the weights minimise the negative log-likelihood (NLL) on a
validation split, and a held-out test split compares the learned mix with the
uniform average and with the single model that is best on validation.

The mixture NLL is convex in the weights, so its minimiser on the simplex is
computed exactly as a reference (float64 EM iterations on the mixture weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import sumto

__all__ = ["SMOOTHING", "run_ensemble"]

LEARNING_RATE = 0.05
# Every model's class probabilities are smoothed as (p + s) / (1 + C s): a decision
# tree or naive Bayes puts exactly 0 (or an underflowed 1e-300) on classes it rules
# out, and log(0) would let one sure-and-wrong prediction dominate the mean NLL.
SMOOTHING = 1e-6
SPLIT = (0.5, 0.25, 0.25)  # train / validation / test fractions


def _models(seed: int) -> dict[str, Any]:
    """The classifiers, fixed by ``seed``: a mix of strong and weak models."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    return {
        "logistic regression": make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=500)
        ),
        "k-NN (k=5)": KNeighborsClassifier(n_neighbors=5),
        "MLP (32 hidden)": make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=seed),
        ),
        "Gaussian naive Bayes": GaussianNB(),
        "decision tree (depth 6)": DecisionTreeClassifier(max_depth=6, random_state=seed),
    }


def _split(seed: int) -> dict[str, tuple[Any, Any]]:
    """Stratified train / validation / test split of the bundled digits data set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=SPLIT[0], stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=SPLIT[1] / (1.0 - SPLIT[0]), stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def _fit_models(seed: int, splits: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Tensor]]:
    """Fit every model on the train split; class probabilities ``(K, N, C)`` per split."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    x_train, y_train = splits["train"]
    probs: dict[str, list[Tensor]] = {"validation": [], "test": []}
    # one BLAS/OpenMP thread, like the torch parts: the models are small
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for model in _models(seed).values():
            model.fit(x_train, y_train)
            for split in probs:
                p = torch.from_numpy(model.predict_proba(splits[split][0])).double()
                probs[split].append((p + SMOOTHING) / (1.0 + p.shape[1] * SMOOTHING))
    return {
        split: {
            "probs": torch.stack(p),
            "labels": torch.from_numpy(splits[split][1]).long(),
        }
        for split, p in probs.items()
    }


def _nll(mixed: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``labels`` under ``(N, C)`` probabilities."""
    picked = mixed.gather(1, labels.unsqueeze(1)).squeeze(1)
    return -picked.log().mean()


def _accuracy(mixed: Tensor, labels: Tensor) -> float:
    return float((mixed.argmax(1) == labels).double().mean())


def _mix(weights: Tensor, probs: Tensor) -> Tensor:
    return torch.einsum("k,knc->nc", weights.to(probs.dtype), probs)


def _em_optimum(probs: Tensor, labels: Tensor, iterations: int = 20_000) -> dict[str, Any]:
    """Simplex weights minimising the mixture NLL, by EM in float64.

    Each EM step ``w_k <- w_k * mean_n(p_k(y_n | x_n) / sum_j w_j p_j(y_n | x_n))``
    stays on the simplex and decreases the (convex) NLL; it stops once no weight
    moves by more than 1e-13.
    """
    picked = probs.gather(2, labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)
    k = picked.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    steps = 0
    for steps in range(1, iterations + 1):  # noqa: B007 (reported below)
        new = w * (picked / (w @ picked)).mean(1)
        new = new / new.sum()
        moved = float((new - w).abs().max())
        w = new
        if moved <= 1e-13:
            break
    return {"weights": w, "iterations": steps, "nll": float(-(w @ picked).log().mean())}


def run_ensemble(seed: int, steps: int, bar_factory: Any) -> dict[str, Any]:
    """Learn simplex ensemble weights; compare with uniform and the best single model.

    Args:
        seed: Seed of the split, of the models and of the weights' initialisation.
        steps: Adam steps of the weight training.
        bar_factory: ``(total, desc) -> progress bar``.

    Returns:
        ``{"summary": JSON-ready numbers, "names": model names, "weights": learned
        (K,), "optimum": EM optimum (K,)}``.
    """
    splits = _split(seed)
    names = list(_models(seed))
    bar = bar_factory(len(names) + steps, "5/5 real classifiers")
    try:
        data = _fit_models(seed, splits)
        bar.update(len(names))
        val, test = data["validation"], data["test"]
        torch.manual_seed(seed)
        mix = sumto.WeightedSum(names=names, weights="simplex")
        inputs = {name: val["probs"][k].float() for k, name in enumerate(names)}
        opt = torch.optim.Adam(mix.parameters(), lr=LEARNING_RATE)
        losses: list[float] = []
        for _ in range(steps):
            loss = _nll(mix(inputs), val["labels"])
            losses.append(float(loss.detach()))  # logged every step for the report
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            bar.update(1)
    finally:
        bar.close()
    learned = mix.weights.detach().double()
    optimum = _em_optimum(val["probs"], val["labels"])
    k = len(names)
    val_accuracy = [_accuracy(val["probs"][i], val["labels"]) for i in range(k)]
    best = max(range(k), key=lambda i: (val_accuracy[i], -i))  # first of the most accurate
    candidates = {
        "learned": learned,
        "uniform": torch.full((k,), 1.0 / k, dtype=torch.float64),
        "best_single": torch.nn.functional.one_hot(torch.tensor(best), k).double(),
    }
    test_accuracy = {
        n: _accuracy(_mix(w, test["probs"]), test["labels"]) for n, w in candidates.items()
    }
    test_nll = {
        n: float(_nll(_mix(w, test["probs"]), test["labels"])) for n, w in candidates.items()
    }
    return {
        "summary": {
            "dataset": "the digits shipped with scikit-learn (8x8 images, 10 classes)",
            "samples": {s: int(splits[s][1].shape[0]) for s in splits},
            "models": names,
            "learned_weights": dict(zip(names, learned.tolist(), strict=True)),
            "optimal_weights": dict(zip(names, optimum["weights"].tolist(), strict=True)),
            "max_abs_error": float((learned - optimum["weights"]).abs().max()),
            "validation_nll": {
                "learned": losses[-1] if losses else math.nan,
                "optimum": optimum["nll"],
            },
            "optimum_iterations": optimum["iterations"],
            "best_single_model": names[best],
            "validation_accuracy": dict(zip(names, val_accuracy, strict=True)),
            "test_accuracy": test_accuracy,
            "test_nll": test_nll,
            "model_test_accuracy": {
                name: _accuracy(test["probs"][i], test["labels"]) for i, name in enumerate(names)
            },
            "model_test_nll": {
                name: float(_nll(test["probs"][i], test["labels"])) for i, name in enumerate(names)
            },
            "smoothing": SMOOTHING,
            "steps": steps,
        },
        "names": names,
        "weights": learned,
        "optimum": optimum["weights"],
    }
