"""Rank choice: the paper's threshold rule and a parameter budget spread over all projections."""

import math

from .common import RANK_MULTIPLE
from .statistics import explained_variance


def saving_rank_limit(in_features, out_features):
    """Largest rank k for which a factorisation is smaller than the dense matrix: k * (in + out) < in * out."""
    return (in_features * out_features - 1) // (in_features + out_features)


def choose_rank(eigenvalues, threshold, in_features, out_features, multiple=RANK_MULTIPLE):
    """The paper's rank rule. Returns the rank, or None when the projection should stay full rank.

    k is the smallest multiple of `multiple` whose explained variance reaches `threshold`; the projection is kept
    full rank when k * (in + out) >= in * out, since the factors would then be no smaller than the weight.
    """
    explained = explained_variance(eigenvalues)
    d = explained.shape[0]
    rank = None
    for k in range(multiple, d + 1, multiple):
        # A tiny tolerance: a threshold of exactly 1.0 is reached at full dimension despite rounding.
        if explained[k - 1] >= threshold - 1e-12:
            rank = k
            break
    if rank is None or rank * (in_features + out_features) >= in_features * out_features:
        return None
    return rank


def low_rank_params(in_features, out_features, rank):
    return rank * (in_features + out_features) + out_features


def dense_params(in_features, out_features, has_bias):
    return in_features * out_features + (out_features if has_bias else 0)


def allocate_ranks(spectra, shapes, budget, multiple=RANK_MULTIPLE):
    """Choose ranks for all projections so that their parameters fit `budget` with the most explained variance.

    Args:
        spectra: {name: eigenvalues (descending)}.
        shapes: {name: (in_features, out_features, has_bias)}.
        budget: parameters allowed for all these projections together.

    Returns {name: rank or None (full rank)}. Each projection's value is its explained-variance ratio (1 at full
    rank), so the objective is the sum of ratios: a Lagrangian relaxation picks, for a price per parameter, the
    best option of every projection independently; bisection on the price finds the largest choice within budget,
    and a greedy pass then spends what is left on the best value-per-parameter upgrades. The result is within one
    rank step of the budget unless the budget is unreachable (then ValueError).
    """
    options = {}
    for name, eigenvalues in spectra.items():
        in_features, out_features, has_bias = shapes[name]
        explained = explained_variance(eigenvalues).numpy()
        limit = min(saving_rank_limit(in_features, out_features), explained.shape[0])
        choices = [(k, low_rank_params(in_features, out_features, k), float(explained[k - 1]))
                   for k in range(multiple, limit + 1, multiple)]
        choices.append((None, dense_params(in_features, out_features, has_bias), 1.0))
        options[name] = choices

    minimum = sum(choices[0][1] for choices in options.values())
    if budget < minimum:
        raise ValueError(
            f"a budget of {budget} projection parameters is below the smallest reachable ({minimum}, every projection"
            f" at rank {multiple}); ask for a larger target_size"
        )

    def pick(price):
        picked = {}
        for name, choices in options.items():
            picked[name] = max(range(len(choices)), key=lambda i: choices[i][2] - price * choices[i][1])
        return picked

    def cost(picked):
        return sum(options[name][i][1] for name, i in picked.items())

    # Higher price -> fewer parameters. Bisect in log space between a price that buys everything and one that
    # buys only the smallest options.
    low, high = 1e-14, 1.0
    best = pick(high)
    if cost(pick(low)) <= budget:
        best = pick(low)
    else:
        for _ in range(100):
            mid = math.sqrt(low * high)
            picked = pick(mid)
            if cost(picked) <= budget:
                high, best = mid, picked
            else:
                low = mid
            if high / low < 1 + 1e-9:
                break

    # Greedy fill: each upgrade moves one projection to its next option (next rank step, or full rank).
    spent = cost(best)
    while True:
        candidate, ratio = None, -1.0
        for name, i in best.items():
            choices = options[name]
            if i + 1 >= len(choices):
                continue
            extra = choices[i + 1][1] - choices[i][1]
            gain = choices[i + 1][2] - choices[i][2]
            if spent + extra <= budget and extra > 0 and gain / extra > ratio:
                candidate, ratio = name, gain / extra
        if candidate is None:
            break
        i = best[candidate]
        spent += options[candidate][i + 1][1] - options[candidate][i][1]
        best[candidate] = i + 1
    return {name: options[name][i][0] for name, i in best.items()}


def allocate_ranks_by_threshold(spectra, shapes, budget, multiple=RANK_MULTIPLE):
    """Like `allocate_ranks`, but with one explained-variance threshold for every projection (bisected to fit the
    budget), then the same greedy fill of what is left."""

    def ranks_for(threshold):
        return {name: choose_rank(spectra[name], threshold, shapes[name][0], shapes[name][1], multiple) for name in spectra}

    def cost(ranks):
        return sum(dense_params(*shapes[n]) if r is None else low_rank_params(shapes[n][0], shapes[n][1], r)
                   for n, r in ranks.items())

    low, high = 0.0, 1.0
    best = None
    for _ in range(60):
        mid = (low + high) / 2
        ranks = ranks_for(mid)
        if cost(ranks) <= budget:
            low, best = mid, ranks
        else:
            high = mid
    if best is None:
        return allocate_ranks(spectra, shapes, budget, multiple)  # raises if unreachable
    # Greedy fill by explained variance per parameter, one rank step at a time.
    spent = cost(best)
    explained = {n: explained_variance(spectra[n]).numpy() for n in spectra}
    while True:
        candidate, ratio = None, -1.0
        for name, rank in best.items():
            if rank is None:
                continue
            in_features, out_features, has_bias = shapes[name]
            nxt = rank + multiple
            if nxt > saving_rank_limit(in_features, out_features) or nxt > explained[name].shape[0]:
                extra, gain = dense_params(in_features, out_features, has_bias) - low_rank_params(in_features, out_features, rank), 1.0 - explained[name][rank - 1]
                nxt = None
            else:
                extra, gain = multiple * (in_features + out_features), explained[name][nxt - 1] - explained[name][rank - 1]
            if extra > 0 and spent + extra <= budget and gain / extra > ratio:
                candidate, ratio, step = name, gain / extra, (nxt, extra)
        if candidate is None:
            break
        best[candidate] = step[0]
        spent += step[1]
    return best


__all__ = ["saving_rank_limit", "choose_rank", "low_rank_params", "dense_params", "allocate_ranks",
           "allocate_ranks_by_threshold"]
