"""Exact soft-optimal solution of a tiny token MDP, and exact KL to it (DESIGN.md section 1).

The MDP: a fixed prompt, an action subset of token ids that contains EOS, and a horizon ``H``.
A state is the prompt followed by the completion prefix ``y_<t``; taking EOS ends the path, and so
does the ``H``-th action (the state after it is terminal); the value of an ended state is 0. The
prefix tree is enumerable: depth ``d`` holds the ``k^d`` prefixes made of the ``k`` non-EOS actions.

Tables. Everything is kept as one tensor per depth ``d = 0 .. H-1`` with rows in the canonical
order of :attr:`TokenMDP.prefixes` (lexicographic in the non-EOS actions; the child of row ``i``
by the ``j``-th non-EOS action is row ``i * k + j`` at depth ``d + 1``) and columns in the order
of :attr:`TokenMDP.actions`. A *policy table* is a list of ``[k^d, A]`` log-probability tensors.

The backward recursion, batched over all prefixes of a depth (fp64)::

    r~(s, a)  = r(s, a) + tau * log pi_ref(a|s)            (r~ = r without a reference)
    Q*(s, a)  = r~(s, a) + gamma * V*(s . a)               (V* of an ended state is 0)
    V*(s)     = tau * logsumexp_a Q*(s, a) / tau
    pi*(a|s)  = exp((Q*(s, a) - V*(s)) / tau)

``pi_ref`` (and any model's ``pi_theta``) is the causal LM's next-token distribution restricted to
the action subset and renormalised. With ``ref_model=None`` the recursion uses ``r~ = r`` (plain
max-entropy RL), and the uniform policy stands in for ``pi_ref`` where a behaviour policy is needed.

Exact sequence KL, forward over depths with reach probabilities ``rho``::

    KL(p || q) = sum_d sum_s rho_p(s) sum_a p(a|s) [log p(a|s) - log q(a|s)]

Vocabulary 8 and horizon 5 (2801 states, 19608 sequences) solve in well under a second on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .losses import check_gamma
from .soft import check_tau, path_mask


Tables = list[torch.Tensor]

# ----------------------------------------------------------------------------- the MDP


class TokenMDP:
    """A tiny deterministic token MDP with its reward tables (and reference tables, if any).

    Args:
        actions: the token ids an agent may take, EOS among them (columns of every table).
        eos_token_id: the terminating action.
        horizon: the length limit ``H``: the state after ``H`` actions is terminal.
        prompt: token ids before the completion (needed, non-empty, when a model is evaluated).
        tau, gamma: temperature ``> 0`` and discount in ``(0, 1]``.
        token_reward: per-token reward, one of
            * a callable ``r(prefix: tuple[int, ...], action: int) -> float`` (``prefix`` is the
              completion so far, without the prompt);
            * with ``batched=True``, a callable ``r(prefixes: LongTensor[N, d], actions: LongTensor[A])
              -> Tensor[N, A]``;
            * a list of ``H`` tensors ``[k^d, A]`` in the table order.
        sequence_reward: per-sequence reward, put on the last token (EOS, or the ``H``-th action):
            a callable ``R(sequence: tuple[int, ...]) -> float`` or, with ``batched=True``,
            ``R(sequences: LongTensor[N, L]) -> Tensor[N]`` (all of one length ``L``).
        ref_model: any causal LM used as ``pi_ref`` (restricted to ``actions``), or None.
    Give exactly one of ``token_reward`` and ``sequence_reward``.
    """

    def __init__(
        self,
        actions: Sequence[int],
        eos_token_id: int,
        horizon: int,
        *,
        prompt: Sequence[int] = (),
        tau: float = 1.0,
        gamma: float = 1.0,
        token_reward: Callable | Sequence[torch.Tensor] | None = None,
        sequence_reward: Callable | None = None,
        batched: bool = False,
        ref_model=None,
    ) -> None:
        self.actions = tuple(int(a) for a in actions)
        if len(self.actions) < 2 or len(set(self.actions)) != len(self.actions):
            raise ValueError(f"actions must be >= 2 distinct token ids, got {list(actions)!r}")
        if min(self.actions) < 0:
            raise ValueError(f"actions must be non-negative token ids, got {list(actions)!r}")
        if eos_token_id not in self.actions:
            raise ValueError(f"eos_token_id {eos_token_id!r} must be one of actions {list(self.actions)}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        if (token_reward is None) == (sequence_reward is None):
            raise ValueError("give exactly one of token_reward and sequence_reward")
        self.eos = int(eos_token_id)
        self.horizon = horizon
        self.prompt = tuple(int(t) for t in prompt)
        self.tau = check_tau(tau)
        self.gamma = check_gamma(gamma)
        self.eos_col = self.actions.index(self.eos)
        self.nonterm_cols = [c for c, a in enumerate(self.actions) if a != self.eos]
        self.k = len(self.nonterm_cols)
        if self.num_states > 5_000_000:
            raise ValueError(f"the prefix tree has {self.num_states} states; reduce actions or horizon (max 5e6)")
        self.action_ids = torch.tensor(self.actions, dtype=torch.long)
        # column of each token id (-1 off the subset) and child slot j of each column (-1 for EOS)
        self._col_of = torch.full((max(self.actions) + 1,), -1, dtype=torch.long)
        self._col_of[self.action_ids] = torch.arange(len(self.actions))
        self._child_of_col = torch.full((len(self.actions),), -1, dtype=torch.long)
        self._child_of_col[self.nonterm_cols] = torch.arange(self.k)
        self.prefixes = self._build_prefixes()
        self.rewards = self._reward_tables(token_reward, sequence_reward, batched)
        self.ref_model = ref_model
        self.ref_log_pi = None if ref_model is None else policy_log_probs(ref_model, self)

    # ---- sizes and tree

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_states(self) -> int:
        """Non-terminal states, all depths: ``sum_{d<H} k^d``."""
        return sum(self.k**d for d in range(self.horizon))

    @property
    def num_sequences(self) -> int:
        """Complete sequences: ended by EOS at some depth, or of length ``H`` without EOS."""
        return self.num_states + self.k**self.horizon

    def _build_prefixes(self) -> list[torch.Tensor]:
        nonterm_ids = self.action_ids[self.nonterm_cols]
        out = [torch.zeros(1, 0, dtype=torch.long)]
        for _ in range(1, self.horizon):
            prev = out[-1]
            n = prev.shape[0]
            out.append(torch.cat([prev.repeat_interleave(self.k, 0), nonterm_ids.repeat(n)[:, None]], dim=1))
        return out

    # ---- rewards

    def _reward_tables(self, token_reward, sequence_reward, batched) -> Tables:
        h, a_n = self.horizon, self.num_actions
        tables: Tables = []
        if token_reward is not None and not callable(token_reward):
            tables = [torch.as_tensor(t, dtype=torch.float64) for t in token_reward]
            if len(tables) != h:
                raise ValueError(f"token_reward must hold one table per depth ({h}), got {len(tables)}")
            for d, t in enumerate(tables):
                if t.shape != (self.k**d, a_n):
                    raise ValueError(f"token_reward[{d}] must have shape {(self.k**d, a_n)}, got {tuple(t.shape)}")
        else:
            for d in range(h):
                prefixes = self.prefixes[d]
                last = d == h - 1
                if token_reward is not None and batched:
                    t = torch.as_tensor(token_reward(prefixes, self.action_ids.clone()), dtype=torch.float64)
                    if t.shape != (prefixes.shape[0], a_n):
                        raise ValueError(
                            f"token_reward returned shape {tuple(t.shape)} at depth {d}, "
                            f"expected {(prefixes.shape[0], a_n)}"
                        )
                elif token_reward is not None:
                    rows = [tuple(p) for p in prefixes.tolist()]
                    t = torch.tensor(
                        [[float(token_reward(p, a)) for a in self.actions] for p in rows],
                        dtype=torch.float64,
                    ).reshape(len(rows), a_n)
                else:
                    t = torch.zeros(prefixes.shape[0], a_n, dtype=torch.float64)
                    cols = list(range(a_n)) if last else [self.eos_col]
                    for c in cols:
                        seqs = torch.cat([prefixes, self.action_ids[c].expand(prefixes.shape[0], 1)], dim=1)
                        if batched:
                            vals = torch.as_tensor(sequence_reward(seqs), dtype=torch.float64).reshape(-1)
                            if vals.shape[0] != seqs.shape[0]:
                                raise ValueError(
                                    f"sequence_reward returned {vals.shape[0]} values for {seqs.shape[0]} sequences"
                                )
                        else:
                            vals = torch.tensor(
                                [float(sequence_reward(tuple(s))) for s in seqs.tolist()],
                                dtype=torch.float64,
                            )
                        t[:, c] = vals
                tables.append(t)
        for d, t in enumerate(tables):
            if not torch.isfinite(t).all():
                raise ValueError(f"reward is not finite at depth {d}")
        return tables

    # ---- paths

    def path_indices(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Locate completion paths ``tokens [n, L]`` (``L <= H``) in the tree.

        A path runs until its first EOS (inclusive), the first 0 of ``mask``, or ``L``; what follows
        is ignored (padding, tokens after EOS). Returns ``(state_row, action_col, on_path)``, each
        ``[n, L]``: the row of ``s_t`` in its depth's table, the column of ``a_t`` (both -1 off the
        path) and the path mask (float).
        """
        if tokens.dim() != 2 or tokens.shape[1] > self.horizon:
            raise ValueError(
                f"tokens must be [n, L] with L <= horizon {self.horizon}, got shape {tuple(tokens.shape)}"
            )
        tokens = tokens.long().cpu()
        n, length = tokens.shape
        if mask is None:
            mask = torch.ones(n, length)
        elif mask.shape != tokens.shape:
            raise ValueError(f"mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}")
        mask = mask.cpu().bool()
        # keep while the mask was never 0 before; then cut after the first EOS
        mask = mask & (torch.cumsum((~mask).long(), dim=1) == 0)
        on = path_mask(tokens, mask, self.eos).bool()
        in_range = (tokens >= 0) & (tokens < self._col_of.shape[0])
        cols = torch.where(in_range, self._col_of[tokens.clamp(0, self._col_of.shape[0] - 1)], -1)
        bad = on & (cols < 0)
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(f"tokens[{b}, {t}] = {tokens[b, t].item()} is not one of actions {list(self.actions)}")
        cols = torch.where(on, cols, -1)
        rows = torch.full((n, length), -1, dtype=torch.long)
        row = torch.zeros(n, dtype=torch.long)
        for t in range(length):
            rows[:, t] = torch.where(on[:, t], row, -1)
            child = self._child_of_col[cols[:, t].clamp(min=0)]
            row = row * self.k + child.clamp(min=0)
        return rows, cols, on.float()

    def gather(self, tables: Tables, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``tables[t][rows[:, t], cols[:, t]]`` as ``[n, L]`` (0 where ``rows`` is -1)."""
        out = torch.zeros(rows.shape, dtype=tables[0].dtype)
        for t in range(rows.shape[1]):
            on = rows[:, t] >= 0
            out[on, t] = tables[t][rows[on, t], cols[on, t]]
        return out

    def step_rewards(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-step rewards ``r [n, L]``, reference log-probs ``[n, L]`` (None without a reference)
        and the path mask, for completion paths ``tokens`` (see :meth:`path_indices`); fp32."""
        rows, cols, on = self.path_indices(tokens, mask)
        r = self.gather(self.rewards, rows, cols).float()
        ref = None if self.ref_log_pi is None else self.gather(self.ref_log_pi, rows, cols).float()
        return r, ref, on

    def uniform_log_probs(self) -> Tables:
        """The uniform policy over the action subset, as a policy table."""
        lp = -math.log(self.num_actions)
        return [torch.full((self.k**d, self.num_actions), lp, dtype=torch.float64) for d in range(self.horizon)]

    def behaviour_log_probs(self) -> Tables:
        """``pi_ref``'s table, or the uniform policy when there is no reference."""
        return self.ref_log_pi if self.ref_log_pi is not None else self.uniform_log_probs()


# ----------------------------------------------------------------------------- models as tables


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def restricted_logits(model, mdp: TokenMDP, tokens: torch.Tensor, *, output_hidden_states: bool = False):
    """The model's logits at the completion states ``s_0 .. s_{L-1}`` of paths ``tokens [n, L]``,
    restricted to the action subset: ``[n, L, A]`` (with gradient). With ``output_hidden_states``
    also returns the last hidden states there, ``[n, L, hidden]``."""
    if not mdp.prompt:
        raise ValueError("the MDP needs a non-empty prompt to evaluate a model (e.g. a BOS token)")
    device = _model_device(model)
    n, length = tokens.shape
    prompt = torch.tensor(mdp.prompt, dtype=torch.long).expand(n, -1)
    ids = torch.cat([prompt, tokens[:, : max(length - 1, 0)].long().clamp(min=0).cpu()], dim=1).to(device)
    out = model(input_ids=ids, output_hidden_states=output_hidden_states)
    p = len(mdp.prompt)
    logits = out.logits[:, p - 1 : p - 1 + length][..., mdp.action_ids.to(device)]
    if output_hidden_states:
        return logits, out.hidden_states[-1][:, p - 1 : p - 1 + length]
    return logits


def policy_log_probs(model, mdp: TokenMDP, *, grad: bool = False, batch_size: int = 4096) -> Tables:
    """The model's policy table: ``log pi_theta(a|s)`` restricted to the action subset and
    renormalised, for every state of the tree (fp64; differentiable with ``grad=True``).

    One forward of the deepest prefixes gives every state: row ``i`` of depth ``d`` is position
    ``d`` of deepest prefix ``i * k^(H-1-d)``.
    """
    h, k = mdp.horizon, mdp.k
    deepest = mdp.prefixes[h - 1]
    chunks = []
    with torch.set_grad_enabled(grad):
        for start in range(0, deepest.shape[0], batch_size):
            part = deepest[start : start + batch_size]
            tokens = torch.cat([part, torch.zeros(part.shape[0], 1, dtype=torch.long)], dim=1)
            logits = restricted_logits(model, mdp, tokens)
            chunks.append(torch.log_softmax(logits.double(), dim=-1).cpu())
        lp = torch.cat(chunks, dim=0)  # [k^(H-1), H, A]
        return [lp[:: k ** (h - 1 - d), d] for d in range(h)]


# ----------------------------------------------------------------------------- the solution


@dataclass
class OracleSolution:
    """``Q*``, ``V*`` and ``log pi*`` per depth (fp64); ``V*`` of ended states is 0."""

    mdp: TokenMDP
    q: Tables
    v: list[torch.Tensor]
    log_pi: Tables
    shaped_rewards: Tables = field(repr=False)

    @property
    def v0(self) -> float:
        """``V*(s_0)``: with gamma = 1, ``tau * log sum_y pi_ref(y) exp(R(y) / tau)``."""
        return float(self.v[0][0])

    def kl(self, model_or_tables) -> float:
        """Exact ``KL(pi_theta || pi*)`` over whole sequences for a model or a policy table."""
        p = model_or_tables if isinstance(model_or_tables, list) else policy_log_probs(model_or_tables, self.mdp)
        return float(sequence_kl(self.mdp, p, self.log_pi))

    def sequences(self) -> SequenceTable:
        """Every complete sequence with its ``pi*`` probability and total reward."""
        return enumerate_sequences(self.mdp, self.log_pi)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """``n`` paths sampled from ``pi*``: ``(tokens [n, H], mask [n, H])``."""
        return sample_paths(self.mdp, self.log_pi, n, generator)

    def log_prob(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``log pi*(y)`` of the given paths ``[n]``."""
        return sequence_log_prob(self.mdp, self.log_pi, tokens, mask)

    def path_values(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``V*(s_t)`` along the given paths ``[n, L]`` (0 off the path)."""
        rows, _, _ = self.mdp.path_indices(tokens, mask)
        out = torch.zeros(rows.shape, dtype=torch.float64)
        for t in range(rows.shape[1]):
            on = rows[:, t] >= 0
            out[on, t] = self.v[t][rows[on, t]]
        return out


def solve(mdp: TokenMDP) -> OracleSolution:
    """The backward recursion of the module docstring, batched per depth over all prefixes."""
    tau, gamma, k = mdp.tau, mdp.gamma, mdp.k
    h = mdp.horizon
    q: Tables = [None] * h  # type: ignore[list-item]
    v: list[torch.Tensor] = [None] * h  # type: ignore[list-item]
    lp: Tables = [None] * h  # type: ignore[list-item]
    shaped: Tables = []
    for d in range(h):
        r = mdp.rewards[d]
        if mdp.ref_log_pi is not None:
            r = r + tau * mdp.ref_log_pi[d]
        shaped.append(r)
    v_next = None
    for d in range(h - 1, -1, -1):
        cont = torch.zeros_like(shaped[d])
        if v_next is not None:
            cont[:, mdp.nonterm_cols] = v_next.reshape(-1, k)
        q[d] = shaped[d] + gamma * cont
        v[d] = tau * torch.logsumexp(q[d] / tau, dim=-1)
        lp[d] = (q[d] - v[d][:, None]) / tau
        v_next = v[d]
    return OracleSolution(mdp=mdp, q=q, v=v, log_pi=lp, shaped_rewards=shaped)


# ----------------------------------------------------------------------------- sequences


def sequence_kl(mdp: TokenMDP, p: Tables, q: Tables) -> torch.Tensor:
    """Exact ``KL(p || q)`` between the sequence distributions of two policy tables (nats).

    Forward over depths: ``rho_0 = 1``, ``rho(s . a) = rho(s) p(a|s)``; terms with ``p(a|s) = 0``
    count 0. Differentiable in ``p`` and ``q``.
    """
    reach = torch.ones(1, dtype=p[0].dtype)
    total = torch.zeros((), dtype=p[0].dtype)
    for d in range(mdp.horizon):
        pd = p[d].exp()
        diff = torch.where(pd > 0, p[d] - q[d].to(p[d].dtype), torch.zeros_like(pd))
        total = total + (reach[:, None] * pd * diff).sum()
        reach = (reach[:, None] * pd[:, mdp.nonterm_cols]).reshape(-1)
    return total


@dataclass
class SequenceTable:
    """All complete sequences: ``tokens [M, H]`` (padded with EOS after the end), ``lengths [M]``,
    ``log_prob [M]`` under a policy table and ``reward [M]`` (sum of the raw rewards ``r``)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_prob: torch.Tensor
    reward: torch.Tensor

    def as_list(self) -> list[tuple[tuple[int, ...], float, float]]:
        """``[(sequence, probability, total reward), ...]``."""
        out = []
        for toks, n, lp, r in zip(
            self.tokens.tolist(), self.lengths.tolist(), self.log_prob.tolist(), self.reward.tolist()
        ):
            out.append((tuple(toks[:n]), math.exp(lp), r))
        return out


def enumerate_sequences(mdp: TokenMDP, tables: Tables | None = None) -> SequenceTable:
    """Every complete sequence of the MDP with its log-probability under ``tables`` (default:
    uniform) and its total raw reward. ``len == mdp.num_sequences``."""
    tables = mdp.uniform_log_probs() if tables is None else tables
    h = mdp.horizon
    toks, lens, lps, rews = [], [], [], []
    cum_lp = torch.zeros(1, dtype=torch.float64)
    cum_r = torch.zeros(1, dtype=torch.float64)
    for d in range(h):
        pre = mdp.prefixes[d]
        n = pre.shape[0]
        cols = list(range(mdp.num_actions)) if d == h - 1 else [mdp.eos_col]
        for c in cols:
            seq = torch.full((n, h), mdp.eos, dtype=torch.long)
            seq[:, :d] = pre
            seq[:, d] = mdp.actions[c]
            toks.append(seq)
            lens.append(torch.full((n,), d + 1, dtype=torch.long))
            lps.append(cum_lp + tables[d][:, c].double())
            rews.append(cum_r + mdp.rewards[d][:, c])
        if d < h - 1:
            cum_lp = (cum_lp[:, None] + tables[d][:, mdp.nonterm_cols].double()).reshape(-1)
            cum_r = (cum_r[:, None] + mdp.rewards[d][:, mdp.nonterm_cols]).reshape(-1)
    return SequenceTable(torch.cat(toks), torch.cat(lens), torch.cat(lps), torch.cat(rews))


def sample_paths(
    mdp: TokenMDP, tables: Tables, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` complete paths from a policy table: ``tokens [n, H]`` (EOS after the end) and
    the path mask ``[n, H]`` (1 on the steps, EOS included)."""
    h, k = mdp.horizon, mdp.k
    tokens = torch.full((n, h), mdp.eos, dtype=torch.long)
    mask = torch.zeros(n, h)
    row = torch.zeros(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for d in range(h):
        probs = tables[d][row].double().exp()
        col = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens[:, d] = torch.where(alive, mdp.action_ids[col], mdp.eos)
        mask[:, d] = alive.float()
        alive = alive & (col != mdp.eos_col)
        row = row * k + mdp._child_of_col[col].clamp(min=0)
    return tokens, mask


def sequence_log_prob(
    mdp: TokenMDP, tables: Tables, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_t log pi(a_t|s_t)`` of each path under a policy table, ``[n]`` (fp64)."""
    rows, cols, on = mdp.path_indices(tokens, mask)
    return (mdp.gather(tables, rows, cols) * on.double()).sum(-1)


# ----------------------------------------------------------------------------- demo MDPs and models


def random_mdp(
    *,
    num_actions: int = 4,
    horizon: int = 4,
    reward: str = "token",
    scale: float = 2.0,
    tau: float = 1.0,
    gamma: float = 1.0,
    ref_model=None,
    prompt: Sequence[int] = (7,),
    seed: int = 0,
) -> TokenMDP:
    """A random MDP on tokens ``0 .. num_actions-1`` (EOS is the last): rewards are seeded
    ``N(0, scale^2)`` per (prefix, action) (``reward="token"``) or per complete sequence
    (``"terminal"``), given as plain Python callables."""
    if reward not in ("token", "terminal"):
        raise ValueError(f"reward must be 'token' or 'terminal', got {reward!r}")
    actions = list(range(num_actions))
    eos = num_actions - 1

    def draw(key: tuple[int, ...]) -> float:
        g = torch.Generator().manual_seed(hash((seed,) + key) & 0x7FFFFFFF)
        return scale * float(torch.randn((), generator=g, dtype=torch.float64))

    common = dict(prompt=prompt, tau=tau, gamma=gamma, ref_model=ref_model)
    if reward == "token":
        return TokenMDP(actions, eos, horizon, token_reward=lambda p, a: draw(p + (a,)), **common)
    return TokenMDP(actions, eos, horizon, sequence_reward=lambda y: draw(tuple(y)), **common)
