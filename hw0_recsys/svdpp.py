"""SVD++ (Koren, "Factorization meets the neighborhood", KDD 2008: the BellKor Netflix model) and the
rating models that add temporal dynamics to it (Koren, "Collaborative filtering with temporal
dynamics", KDD 2009).

* :class:`SVDPlusPlus`: ``r_ui = mu + b_u + b_i + q_i . (p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j)``, where
  N(u) is the set of items u rated in the training data: the rating model behind the 5-fold RMSE table.
* :class:`TimeBaseline`: the paper's time-aware baseline predictor
  ``b_ui(t) = mu + b_u + alpha_u dev_u(t) + b_{u,t} + (b_i + b_{i,Bin(t)}) (c_u + c_{u,t})``.
* :class:`TimeSVDPlusPlus`: timeSVD++, that baseline plus SVD++'s factor part with a drifting user
  vector: ``b_ui(t) + q_i . (p_u + alpha^p_u dev_u(t) + |N(u)|^-1/2 sum_{j in N(u)} y_j)``.

Time is in days. ``dev_u(t) = sign(t - t_u) |t - t_u|^beta`` is how far a rating lies from the user's
mean training day t_u: a gradual drift of the user's bias (and factors) with one parameter per user.
``b_{u,t}`` and ``c_{u,t}`` are day-specific: one parameter per (user, day) pair of the training
ratings, which absorbs the mood of a single rating session; a pair unseen in training gets 0.
Item biases drift slowly, so they get one offset per time bin (ml-100k covers about 215 days).
Everything derived from the data (t_u, the (user, day) index, N(u), the penalty weights) is rebuilt
from the training ratings passed in, never stored in checkpoints, as for :class:`SVDPlusPlus`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from common.errors import CS330Error
from hw0_recsys.data import Ratings


def implicit_matrix(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int) -> torch.Tensor:
    """Sparse CSR ``[num_users, num_items]`` holding ``|N(u)|^-1/2`` where u rated the item, zero elsewhere."""
    pairs = torch.unique(torch.stack([users, items]), dim=1)  # [2, nnz], duplicates dropped
    counts = torch.bincount(pairs[0], minlength=num_users).clamp(min=1).float()
    values = counts[pairs[0]].rsqrt()
    matrix = torch.sparse_coo_tensor(pairs, values, (num_users, num_items), check_invariants=True)
    with warnings.catch_warnings():
        # torch notes once per process that sparse CSR is "in beta"; the one product used here
        # (torch.sparse.mm, forward and backward) is covered by the tests, so the note is noise.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return matrix.to_sparse_csr()


def penalty_weights(counts: torch.Tensor, exponent: float) -> torch.Tensor:
    """``counts**exponent``, normalised to sum to 1; parameters no training rating uses get 0.
    With exponent 1 this is the per-rating penalty of SGD (weights = counts / number of ratings)."""
    weights = torch.where(counts > 0, counts.clamp(min=1) ** exponent, torch.zeros_like(counts))
    return weights / weights.sum().clamp(min=1e-12)


class SVDPlusPlus(nn.Module):
    """SVD++ rating model built for full-batch training on a small data set.

    The prediction for every (user, item) pair is one dense ``[U, D] @ [D, I]`` product (1.6M pairs
    for ml-100k), and ratings are gathered from it: on a CPU that is several times faster than
    gathering 80k embedding rows, and its backward pass is two more matrix products.

    The L2 penalty on a parameter grows with the number n of training ratings that use it, as
    ``n**reg_exponent``: 1 is the per-rating penalty of the paper's SGD updates (a user with 300
    ratings pays 300x for ``|p_u|^2``), 0 a plain weight decay; in between worked best on validation
    data. The weights come from the training ratings passed in, which also define N(u); both are
    rebuilt from the data, not stored in checkpoints.
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, train_users: torch.Tensor,
                 train_items: torch.Tensor, global_mean: float, init_std: float = 0.05,
                 reg_exponent: float = 1.0, implicit: bool = True) -> None:
        super().__init__()
        self.num_items = num_items
        self.use_implicit = implicit
        self.implicit = implicit_matrix(train_users, train_items, num_users, num_items)
        user_counts = torch.bincount(train_users, minlength=num_users).float()  # [U] ratings per user
        item_counts = torch.bincount(train_items, minlength=num_items).float()  # [I] ratings per item
        # y_j is used by every rating of every user who rated j: sum of those users' rating counts.
        implicit_counts = torch.zeros(num_items).index_add_(0, train_items, user_counts[train_users])  # [I]
        self.register_buffer("user_weights", penalty_weights(user_counts, reg_exponent), persistent=False)
        self.register_buffer("item_weights", penalty_weights(item_counts, reg_exponent), persistent=False)
        self.register_buffer("implicit_weights", penalty_weights(implicit_counts, reg_exponent), persistent=False)
        self.global_mean = nn.Parameter(torch.tensor(float(global_mean)))  # mu
        self.user_biases = nn.Parameter(torch.zeros(num_users))  # b_u
        self.item_biases = nn.Parameter(torch.zeros(num_items))  # b_i
        self.user_factors = nn.Parameter(torch.randn(num_users, embedding_dim) * init_std)  # p_u
        self.item_factors = nn.Parameter(torch.randn(num_items, embedding_dim) * init_std)  # q_i
        # y_j: zero-initialised, so a model without implicit feedback is plain biased MF.
        self.implicit_factors = nn.Parameter(torch.zeros(num_items, embedding_dim), requires_grad=implicit)

    def _apply(self, fn, *args, **kwargs):  # the sparse N(u) matrix is not a buffer: move it with the model
        super()._apply(fn, *args, **kwargs)
        self.implicit = self.implicit.to(self.user_factors.device)
        return self

    def user_vectors(self) -> torch.Tensor:
        """``[U, D]``: p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j for every user."""
        if not self.use_implicit:
            return self.user_factors
        return self.user_factors + torch.sparse.mm(self.implicit, self.implicit_factors)

    def all_scores(self) -> torch.Tensor:
        """``[U, I]`` predicted ratings (unclipped) for every pair."""
        return (self.global_mean + self.user_biases[:, None] + self.item_biases[None, :]
                + self.user_vectors() @ self.item_factors.T)

    def predict(self, ratings: Ratings) -> torch.Tensor:
        """``[B]`` predicted ratings (unclipped) of the pairs in ``ratings``."""
        return self(ratings.users, ratings.items)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` ids -> ``[B]`` predicted ratings (unclipped)."""
        return self.all_scores().view(-1)[user_ids * self.num_items + item_ids]

    def penalty(self, factor_reg: float, bias_reg: float, implicit_reg: float) -> torch.Tensor:
        """Count-weighted L2 penalty (see the class docstring); the weights of each table sum to 1."""
        factors = (self.user_weights @ self.user_factors.square().sum(-1)
                   + self.item_weights @ self.item_factors.square().sum(-1))
        biases = self.user_weights @ self.user_biases.square() + self.item_weights @ self.item_biases.square()
        total = factor_reg * factors + bias_reg * biases
        if self.use_implicit:
            total = total + implicit_reg * (self.implicit_weights @ self.implicit_factors.square().sum(-1))
        return total


def _days(ratings: Ratings, model: str) -> torch.Tensor:
    if ratings.days is None:
        raise CS330Error(f"{model} needs the day of every rating, but these Ratings have days=None "
                         "(read_ratings fills them from the timestamps)")
    return ratings.days


class TimeBaseline(nn.Module):
    """Koren's time-aware baseline, trained full batch on the mean squared error plus :meth:`penalty`.

    ``c_u`` is stored as ``c_u - 1`` so that every parameter starts at, and is shrunk towards, 0: the
    untrained model is the global mean. The L2 penalty of each table is weighted by how many training
    ratings use each entry (``counts**reg_exponent``, normalised, as in :class:`SVDPlusPlus`).
    ``user_scaling=False`` freezes c_u and c_{u,t} at 0 (so ``c_u + c_{u,t} = 1``).
    Defaults: chosen on a validation slice of u1.base (300 Adam steps at lr 0.01). There, the day
    terms and c_u matter most; ml-100k's 7 months leave little for item bins (weakly shrunk bins
    overfit; 5 or 10 strongly shrunk ones scored within 0.001 RMSE of none), so 10 such bins are kept.
    """

    def __init__(self, num_users: int, num_items: int, train: Ratings, num_bins: int = 10, beta: float = 0.4,
                 bias_reg: float = 0.1, bin_reg: float = 30.0, drift_reg: float = 0.3, day_reg: float = 0.3,
                 scale_reg: float = 0.1, day_scale_reg: float = 1.0, reg_exponent: float = 0.0,
                 user_scaling: bool = True) -> None:
        super().__init__()
        days = _days(train, type(self).__name__)
        users, items = train.users, train.items
        self.num_items, self.num_bins, self.beta = num_items, num_bins, beta
        self.first_day = int(days.min())
        self.span = int(days.max()) - self.first_day + 1  # days covered by the training ratings
        relative = (days - self.first_day).float()  # [R], small numbers keep float32 exact
        user_counts = torch.bincount(users, minlength=num_users).float()  # [U]
        day_sums = torch.zeros(num_users, device=days.device).index_add_(0, users, relative)
        # A user without training ratings has no t_u; the mean day only keeps dev finite (alpha_u gets no gradient).
        mean_day = torch.where(user_counts > 0, day_sums / user_counts.clamp(min=1), relative.mean())
        self.register_buffer("user_mean_day", mean_day, persistent=False)  # [U] t_u - first_day
        keys, key_counts = torch.unique(users * self.span + (days - self.first_day), return_counts=True)
        self.register_buffer("day_keys", keys, persistent=False)  # [K] sorted user * span + day
        bin_counts = torch.bincount(items * num_bins + self._bin(relative), minlength=num_items * num_bins)
        item_counts = torch.bincount(items, minlength=num_items).float()  # [I]
        for name, counts in (("user_weights", user_counts), ("item_weights", item_counts),
                             ("bin_weights", bin_counts.float().view(num_items, num_bins)),
                             ("day_weights", key_counts.float())):
            self.register_buffer(name, penalty_weights(counts, reg_exponent), persistent=False)
        self.regs = {"bias": bias_reg, "bin": bin_reg, "drift": drift_reg, "day": day_reg, "scale": scale_reg,
                     "day_scale": day_scale_reg}
        self.global_mean = nn.Parameter(torch.tensor(float(train.ratings.mean())))  # mu
        self.user_biases = nn.Parameter(torch.zeros(num_users))  # b_u
        self.item_biases = nn.Parameter(torch.zeros(num_items))  # b_i
        self.user_drifts = nn.Parameter(torch.zeros(num_users))  # alpha_u
        self.bin_biases = nn.Parameter(torch.zeros(num_items, num_bins))  # b_{i,Bin(t)}
        self.day_biases = nn.Parameter(torch.zeros(len(keys)))  # b_{u,t}
        self.user_scales = nn.Parameter(torch.zeros(num_users), requires_grad=user_scaling)  # c_u - 1
        self.day_scales = nn.Parameter(torch.zeros(len(keys)), requires_grad=user_scaling)  # c_{u,t}

    def _bin(self, relative: torch.Tensor) -> torch.Tensor:
        """Time bin of each relative day; days outside the training period fall in the end bins."""
        return (relative.long() * self.num_bins // self.span).clamp(0, self.num_bins - 1)

    def deviation(self, users: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
        """``[B]`` dev_u(t) = sign(t - t_u) |t - t_u|^beta."""
        gap = relative.float() - self.user_mean_day[users]
        return gap.sign() * gap.abs().pow(self.beta)

    def _day_terms(self, users: torch.Tensor, relative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` b_{u,t} and c_{u,t}, 0 for a (user, day) pair without training ratings."""
        keys = users * self.span + relative.clamp(0, self.span - 1)
        slot = torch.searchsorted(self.day_keys, keys).clamp(max=len(self.day_keys) - 1)  # [B]
        seen = (self.day_keys[slot] == keys) & (relative >= 0) & (relative < self.span)
        return torch.where(seen, self.day_biases[slot], 0.0), torch.where(seen, self.day_scales[slot], 0.0)

    def predict_with_deviation(self, ratings: Ratings) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` predicted ratings and ``[B]`` dev_u(t) (for the factor drift of timeSVD++)."""
        users, items = ratings.users, ratings.items
        relative = _days(ratings, type(self).__name__) - self.first_day  # [B]
        dev = self.deviation(users, relative)
        day_bias, day_scale = self._day_terms(users, relative)
        item = self.item_biases[items] + self.bin_biases[items, self._bin(relative)]  # b_i + b_{i,Bin(t)}
        scale = 1.0 + self.user_scales[users] + day_scale  # c_u + c_{u,t}
        user = self.global_mean + self.user_biases[users] + self.user_drifts[users] * dev + day_bias
        return user + item * scale, dev

    def predict(self, ratings: Ratings) -> torch.Tensor:
        """``[B]`` predicted ratings (unclipped) of ``ratings.users/items`` on ``ratings.days``."""
        return self.predict_with_deviation(ratings)[0]

    def all_scores(self) -> torch.Tensor:
        """``[U, I]`` predicted ratings at each user's mean training day t_u (dev = 0, no day terms)."""
        bins = self._bin(self.user_mean_day.round())  # [U]
        item = self.item_biases[None, :] + self.bin_biases.T[bins]  # [U, I]
        user = self.global_mean + self.user_biases[:, None]  # [U, 1]
        return user + item * (1.0 + self.user_scales[:, None])

    def penalty(self) -> torch.Tensor:
        """Count-weighted L2 penalty; c_u is shrunk towards 1, every other parameter towards 0."""
        regs, users = self.regs, self.user_weights
        total = regs["bias"] * (users @ self.user_biases.square() + self.item_weights @ self.item_biases.square())
        total = total + regs["bin"] * (self.bin_weights * self.bin_biases.square()).sum()
        total = total + regs["drift"] * (users @ self.user_drifts.square())
        total = total + regs["day"] * (self.day_weights @ self.day_biases.square())
        if self.user_scales.requires_grad:
            total = total + regs["scale"] * (users @ self.user_scales.square())
            total = total + regs["day_scale"] * (self.day_weights @ self.day_scales.square())
        return total


class TimeSVDPlusPlus(nn.Module):
    """timeSVD++: :class:`TimeBaseline` plus the factor part of :class:`SVDPlusPlus` with a user drift.

    ``r_ui(t) = b_ui(t) + q_i . (p_u + alpha^p_u dev_u(t) + |N(u)|^-1/2 sum_{j in N(u)} y_j)``. The
    factor part is an :class:`SVDPlusPlus` whose own mean and biases are frozen at 0 (the baseline
    holds the time-aware ones), so its dense ``[U, D] @ [D, I]`` scoring and its penalty are reused;
    the drift ``(alpha^p_u . q_i) dev_u(t)`` is gathered from a second ``[U, I]`` product, times each dev.
    Defaults: chosen on the same validation slice as :class:`TimeBaseline`'s; y_j and alpha^p_u want
    more shrinkage than in plain SVD++ (alpha^p_u much more: the factor drift adds little on ml-100k).
    """

    def __init__(self, num_users: int, num_items: int, train: Ratings, embedding_dim: int = 50,
                 num_bins: int = 10, beta: float = 0.4, bias_reg: float = 0.1, bin_reg: float = 30.0,
                 drift_reg: float = 0.3, day_reg: float = 0.3, scale_reg: float = 0.1, day_scale_reg: float = 1.0,
                 factor_reg: float = 0.3, implicit_reg: float = 1.5, factor_drift_reg: float = 10.0,
                 reg_exponent: float = 0.0, init_std: float = 0.05, user_scaling: bool = True) -> None:
        super().__init__()
        self.baseline = TimeBaseline(num_users, num_items, train, num_bins, beta, bias_reg, bin_reg, drift_reg,
                                     day_reg, scale_reg, day_scale_reg, reg_exponent, user_scaling)
        self.factors = SVDPlusPlus(num_users, num_items, embedding_dim, train.users, train.items, 0.0, init_std,
                                   reg_exponent)
        for frozen in (self.factors.global_mean, self.factors.user_biases, self.factors.item_biases):
            frozen.requires_grad_(False)
        self.factor_drifts = nn.Parameter(torch.zeros(num_users, embedding_dim))  # alpha^p_u
        self.factor_reg, self.implicit_reg, self.factor_drift_reg = factor_reg, implicit_reg, factor_drift_reg

    def _factor_scores(self) -> torch.Tensor:
        """``[U, I]`` q_i . (p_u + |N(u)|^-1/2 sum y_j), without the drift."""
        return self.factors.user_vectors() @ self.factors.item_factors.T

    def predict(self, ratings: Ratings) -> torch.Tensor:
        """``[B]`` predicted ratings (unclipped) of ``ratings.users/items`` on ``ratings.days``."""
        users, items = ratings.users, ratings.items
        baseline, dev = self.baseline.predict_with_deviation(ratings)  # [B], [B]
        pairs = users * self.baseline.num_items + items  # [B] indices into a flattened [U, I]
        # alpha^p_u . q_i for every pair is one more dense product: on a CPU faster (README) than
        # gathering two [B, D] rows per rating and scattering their gradients back.
        drift = (self.factor_drifts @ self.factors.item_factors.T).view(-1)[pairs] * dev  # [B]
        return baseline + self._factor_scores().view(-1)[pairs] + drift

    def all_scores(self) -> torch.Tensor:
        """``[U, I]`` predicted ratings at each user's mean training day (no drift, no day terms)."""
        return self.baseline.all_scores() + self._factor_scores()

    def penalty(self) -> torch.Tensor:
        """The baseline's penalty plus SVD++'s on p_u, q_i, y_j, plus one on alpha^p_u weighted like p_u."""
        factors = self.factors.penalty(self.factor_reg, 0.0, self.implicit_reg)  # its frozen biases are 0
        drifts = self.factors.user_weights @ self.factor_drifts.square().sum(-1)
        return self.baseline.penalty() + factors + self.factor_drift_reg * drifts
