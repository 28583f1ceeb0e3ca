"""The two models of the homework.

* :class:`MultiTaskNet` (the course model): one pair of user/item embeddings serves two tasks,
  a factorization head that scores whether a user interacts with an item (ranking, trained with
  negative sampling) and an MLP head that regresses the rating. With ``embedding_sharing=False``
  each task gets its own embeddings, which is the single-task baseline.
* :class:`ItemAutoRec`: I-AutoRec, an item-based autoencoder rating model; blended with SVD++ in
  the 5-fold table (the blend is done by ``experiments.py`` from the saved predictions).
* :class:`SVDPlusPlus` (Koren's "Factorization meets the neighborhood", the BellKor Netflix model):
  ``r_ui = mu + b_u + b_i + q_i . (p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j)``, where N(u) is the set
  of items u rated in the training data. It is the rating model behind the 5-fold RMSE table.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from hw0_recsys.data import Ratings


class ScaledEmbedding(nn.Embedding):
    """Embedding initialised with N(0, 1/dim^2), as in Spotlight: small dot products at the start."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0 / self.embedding_dim)


class ZeroEmbedding(nn.Embedding):
    """Embedding initialised to zero, for biases."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class MultiTaskNet(nn.Module):
    """Shared (or separate) embeddings with a factorization head and a rating-regression head."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 32,
                 layer_sizes: Sequence[int] = (96, 64), embedding_sharing: bool = True) -> None:
        super().__init__()
        self.embedding_sharing = embedding_sharing
        self.user_embeddings = ScaledEmbedding(num_users, embedding_dim)  # U
        self.item_embeddings = ScaledEmbedding(num_items, embedding_dim)  # Q
        self.user_biases = ZeroEmbedding(num_users, 1)  # A
        self.item_biases = ZeroEmbedding(num_items, 1)  # B
        if not embedding_sharing:
            self.regression_user_embeddings = ScaledEmbedding(num_users, embedding_dim)
            self.regression_item_embeddings = ScaledEmbedding(num_items, embedding_dim)
        layers: list[nn.Module] = []
        width = 3 * embedding_dim  # the MLP reads [U, Q, U*Q]
        for size in layer_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.regression_mlp = nn.Sequential(*layers)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` user and item ids -> (interaction logits ``[B]``, predicted ratings ``[B]``)."""
        user = self.user_embeddings(user_ids)  # [B, D]
        item = self.item_embeddings(item_ids)  # [B, D]
        logits = (user * item).sum(-1) + self.user_biases(user_ids).squeeze(-1) + self.item_biases(item_ids).squeeze(-1)
        if not self.embedding_sharing:
            user = self.regression_user_embeddings(user_ids)
            item = self.regression_item_embeddings(item_ids)
        score = self.regression_mlp(torch.cat([user, item, user * item], dim=-1)).squeeze(-1)  # [B]
        return logits, score

    @torch.no_grad()
    def all_logits(self) -> torch.Tensor:
        """``[num_users, num_items]`` factorization logits for every pair, for the ranking metrics."""
        return (self.user_embeddings.weight @ self.item_embeddings.weight.T
                + self.user_biases.weight + self.item_biases.weight.T)


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


class ItemAutoRec(nn.Module):
    """I-AutoRec (Sedhain et al. 2015): an autoencoder that reconstructs each item's column of ratings.

    Item i's input is its vector of training ratings over all users (0 where unrated); one sigmoid
    hidden layer; a linear output read at the users whose rating is wanted. The loss counts observed
    ratings only. In the spirit of the RBM that BellKor blended with its factor models: it models an
    item from the whole pattern of who rated it and how, which is why it blends well with SVD++.
    Ratings of items with no training rating fall back to the global mean. Like N(u) of
    :class:`SVDPlusPlus`, the input matrix is rebuilt from the training data, not checkpointed.
    """

    def __init__(self, num_users: int, num_items: int, hidden_size: int, train_users: torch.Tensor,
                 train_items: torch.Tensor, train_ratings: torch.Tensor) -> None:
        super().__init__()
        self.num_users = num_users
        ratings = torch.zeros(num_items, num_users)  # [I, U] training stars, 0 = unrated
        ratings[train_items, train_users] = train_ratings.float()
        self.register_buffer("item_ratings", ratings, persistent=False)
        self.register_buffer("item_seen", torch.bincount(train_items, minlength=num_items) > 0, persistent=False)
        self.global_mean = float(train_ratings.float().mean())
        self.num_ratings = len(train_ratings)
        self.encoder = nn.Linear(num_users, hidden_size)
        self.decoder = nn.Linear(hidden_size, num_users)

    def all_scores(self) -> torch.Tensor:
        """``[U, I]`` predicted ratings (unclipped) for every pair."""
        reconstructed = self.decoder(torch.sigmoid(self.encoder(self.item_ratings)))  # [I, U]
        reconstructed = torch.where(self.item_seen[:, None], reconstructed, torch.full_like(reconstructed,
                                                                                            self.global_mean))
        return reconstructed.T

    def predict(self, ratings: Ratings) -> torch.Tensor:
        """``[B]`` predicted ratings (unclipped) of the pairs in ``ratings``."""
        return self(ratings.users, ratings.items)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` ids -> ``[B]`` predicted ratings (unclipped)."""
        return self.all_scores().reshape(-1)[user_ids * self.item_ratings.shape[0] + item_ids]

    def penalty(self, weight_reg: float) -> torch.Tensor:
        """The paper's ``lambda/2 (|W|^2 + |V|^2)``, divided by the number of training ratings, as the
        loss is a mean over ratings rather than the paper's sum."""
        squares = self.encoder.weight.square().sum() + self.decoder.weight.square().sum()
        return weight_reg / 2 * squares / self.num_ratings
