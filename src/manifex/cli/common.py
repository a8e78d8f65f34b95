"""Option parsers and helpers shared by the commands of every system."""
from __future__ import annotations

import click


def _csv(ctx, param, value: str | None):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _fraction(ctx, param, value: str | None):
    """'8/255' or '0.03' → float; 'none' → None."""
    if value is None or value.lower() == "none":
        return None
    try:
        num, _, den = value.partition("/")
        return float(num) / (float(den) if den else 1.0)
    except ValueError:
        raise click.BadParameter(f"expected a number such as 0.03 or 8/255, got {value!r}") from None


def _beta_pair(ctx, param, value: str):
    if value.lower() in ("none", "off"):
        return None
    if value.lower() == "auto":
        return "auto"
    try:
        b0, b1 = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected 'B0,B1' (e.g. 10,100), 'auto' or 'none', got {value!r}") from None
    return (b0, b1)


def _betas(ctx, param, value: str):
    try:
        betas = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 10,3,1, got {value!r}") from None
    if any(b <= 0 for b in betas):
        raise click.BadParameter("every β must be > 0")
    return betas


def _trained_classifier(dataset, classifier, epochs, seed, device, cache_dir, trust_pickle, quiet):
    """(model, train, test, info) shared by the manipulation commands: the classifier is cached."""
    from ..data import load_dataset
    from ..models import ModelCache, TrainConfig, get_classifier

    data = load_dataset(dataset, trust_pickle=trust_pickle)
    train, test = data.split(0.2, seed=seed)
    model, info = get_classifier(train, classifier, TrainConfig(epochs=epochs, seed=seed), cache=ModelCache(cache_dir),
                                 device=device, progress=not quiet)
    return model, data, test, info


