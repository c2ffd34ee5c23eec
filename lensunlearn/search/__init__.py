"""`search`: a small grid search over `unlearn` or `distill` settings, run in this process and resumable.

`--grid KEY=V1,V2` (repeated) names an option of the searched command (`--stage`, unlearn unless
told) and the values to try; the grid is the cross product of the options given. Every other setting
is fixed: for unlearn, `--preset`, then unlearn's own flags in one quoted string (`--unlearn "--forget
facts:x --eval_tasks ..."`, a `--config FILE` among them); for distill, distill's flags in
`--distill "--run DIR ..."`, the finished unlearning run that every point distils among them (the
shrink-and-perturb share and the step budget are what its users search). Both go through the
command's own option machinery, so a grid value is read exactly as the same flag on its command line
would be, and every point's config is built (and refused, with one line) before anything trains.

Each point is one run of the command, `OUT/runs/<point>`, named from its grid values
(`lr1e-3_forget_coef10`, `alpha0.1_steps80`), run after the others in this process. Rerunning the
same command continues the search: a finished run is reused once its saved config is checked to be
the point's, an interrupted one continues from its checkpoint (the command's `--resume`), and a value
added to the grid adds runs. A finished run is then measured (`--measure`), a distilled run like an
unlearned one (its base model and forget corpus are its source run's):

* `eval`: its `eval.json` against the base model's accuracy (the run's `base_eval.json`, else one
  base evaluation that the search makes and keeps under `OUT/base/`): the forget-domain accuracy
  (`--forget_task`, by default the first eval task), every kept domain (the other eval tasks) as a
  share of the base model's, and the perplexity of held-out generic text (`--generic`) as a multiple
  of the base model's;
* `robustness`: the same accuracies, and the robustness protocol on the run
  (`OUT/robustness/<point>`, its options from `--robustness`): the unseen-half envelope after
  the largest attack (and the worst case beside it, never a target), the unlearned model's unseen-half
  accuracy, the recovery share, the unseen half
  under the attack chosen on the other fold, each paper's own attack (`--robustness "--paper_attacks
  all"`) and the fictional-facts floor; the perplexities are the protocol's.

`search.json` holds every point (settings, metrics, which targets it meets, wall times) and
`search.md` the table in the order of `rank_points`, which never puts a point that broke the model
ahead of one that kept its general ability.
"""

from __future__ import annotations

from ..core.lazy import attributes_from

# `lensunlearn.<package>.X` as before the package was split: the options first (no torch), else the runner.
__getattr__ = attributes_from(__name__, ("options", "run"))
