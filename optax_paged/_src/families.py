"""The optimizer family table: every public optimizer factory comes from here.

One ``Family`` per algorithm. Its kernel (the element update in
``ffi/optimizer_math.h``) names the hyperparameter slots; the entry says how
the factory's arguments fill them (``slots``), what each argument means and
accepts, the reference maths in ``jax.numpy`` (for a family that is its own
kernel), the optax counterpart and the storage variants offered.
``factories.py`` builds one function per (family, variant); the tests
iterate this table. The docs page "Adding an optimizer" walks through a row.
"""

import jax.numpy as jnp
import optax

from optax_paged._src import base
from optax_paged._src import hyperparam_checks
from optax_paged._src import hyperparams
from optax_paged._src import transform
from optax_paged._src import trust_ratio
from optax_paged._src.family import Family
from optax_paged._src.family import Hyperparameter

_ALL = ('8bit', 'paged_8bit', 'paged_32bit', '4bit', 'paged_4bit')
_EIGHT_AND_PAGED = ('8bit', 'paged_8bit', 'paged_32bit')
_EIGHT_ONLY = ('8bit',)
_SCHEDULE = 'base.ScalarOrSchedule'


def _must_be_none(what: str):
  def check(name, value):
    if value is not None:
      raise ValueError(
          f'{name}={value!r}: optax_paged stores {what} blockwise in 8 '
          'bits (or fp32 for small leaves and the fp32 optimizers) and '
          'computes in fp32; a dtype does not apply. Leave it None.')
  return check


def _rate_or_one(name, value):
  hyperparam_checks.rate(name, value, one_allowed=True)


# Arguments several families share, each written once.
B1 = Hyperparameter('b1', 0.9, 'float',
                    'exponential decay rate of the first moment.',
                    hyperparam_checks.rate)
B2 = Hyperparameter('b2', 0.999, 'float',
                    'exponential decay rate of the second moment.',
                    hyperparam_checks.rate)
EPS = Hyperparameter('eps', 1e-8, 'float',
                     'added to the denominator for numerical stability.',
                     hyperparam_checks.non_negative)
WEIGHT_DECAY = Hyperparameter(
    'weight_decay', 1e-4, _SCHEDULE,
    'decoupled weight decay strength, a scalar or a schedule of the step '
    'count.', hyperparam_checks.finite)
L2_WEIGHT_DECAY = WEIGHT_DECAY.replace(
    default=0.0, doc='L2 weight decay added to the gradient, a scalar or a '
    'schedule of the step count.')
MASK = Hyperparameter(
    'mask', None, 'Any',
    'which parameters get weight decay: a tree of booleans with the '
    'structure of the parameters (or a prefix of it), or a callable that '
    "returns one given the parameters; as ``{optax}``'s ``mask``.")
EPS_ROOT = Hyperparameter(
    'eps_root', 0.0, 'float',
    'added to the bias-corrected second moment inside the square root, as '
    "``optax.adamw``'s ``eps_root``.", hyperparam_checks.non_negative,
    keyword_only=True)
MU_DTYPE = Hyperparameter(
    'mu_dtype', None, 'Any',
    "must be None: the first moment's storage is the optimizer's (8-bit "
    "blockwise or fp32), not a dtype; accepted for optax's spelling.",
    _must_be_none('the first moment'), keyword_only=True)
NESTEROV = Hyperparameter(
    'nesterov', False, 'bool',
    "Nesterov momentum (NAdam's look-ahead), as ``{optax}``'s.",
    keyword_only=True)
MOMENTUM = Hyperparameter('momentum', 0.9, 'float',
                          'the momentum decay rate.', hyperparam_checks.rate)

ADAMW_MATHS = r"""The update is optax's AdamW, :math:`u = -\eta\,(\hat m /
(\sqrt{\hat v} + \epsilon) + \lambda p)`, with bias-corrected moments
:math:`\hat m = m / (1 - b_1^t)`, :math:`\hat v = v / (1 - b_2^t)`,
computed in fp32."""


def _adamw_slots(v, count, count_inc):
  nesterov = bool(v.get('nesterov', False))
  return dict(
      learning_rate=base.value_at(v['learning_rate'], count),
      b1=v['b1'], one_minus_b1=hyperparams.one_minus(v['b1']),
      b2=v['b2'], one_minus_b2=hyperparams.one_minus(v['b2']),
      eps=v['eps'], weight_decay=base.value_at(v.get('weight_decay', 0.0),
                                               count),
      bias_correction1=hyperparams.bias_correction(v['b1'], count_inc),
      bias_correction2=hyperparams.bias_correction(v['b2'], count_inc),
      eps_root=v.get('eps_root', 0.0), nesterov=1.0 if nesterov else 0.0,
      # Nesterov's look-ahead corrects the new moment by the next step's
      # factor.
      bias_correction1_next=(hyperparams.bias_correction(
          v['b1'], optax.safe_increment(count_inc)) if nesterov else 1.0))


def _adamw_update(s, g, p, decay, moments):
  m = s['one_minus_b1'] * g + s['b1'] * moments[0]
  v = s['one_minus_b2'] * (g * g) + s['b2'] * moments[1]
  m_hat = jnp.where(
      s['nesterov'] != 0,
      s['b1'] * (m * (1 / s['bias_correction1_next']))
      + s['one_minus_b1'] * (g * (1 / s['bias_correction1'])),
      m * (1 / s['bias_correction1']))
  v_hat = v * (1 / s['bias_correction2'])
  v_hat = jnp.where(s['eps_root'] != 0, v_hat + s['eps_root'], v_hat)
  direction = m_hat / (jnp.sqrt(v_hat) + s['eps'])
  if decay:
    direction = direction + s['weight_decay'] * p
  return -s['learning_rate'] * direction, [m, v]


ADAMW = Family(
    name='adamw', kernel='adamw', title='AdamW',
    hyperparameters=(B1, B2, EPS, WEIGHT_DECAY, MASK, EPS_ROOT, MU_DTYPE,
                     NESTEROV),
    slots=_adamw_slots, variants=_ALL, maths=ADAMW_MATHS,
    references=(
        'Loshchilov & Hutter, `Decoupled Weight Decay Regularization '
        '<https://arxiv.org/abs/1711.05101>`_, 2019.\n'
        'Dettmers et al., `8-bit Optimizers via Block-wise Quantization '
        '<https://arxiv.org/abs/2110.02861>`_, 2022.'),
    example='learning_rate=1e-3, weight_decay=0.01', optax='optax.adamw',
    reference_update=_adamw_update,
)

# Adam is AdamW's kernel without weight decay; its states are AdamW's.
ADAM = Family(
    name='adam', kernel='adamw', title='Adam', state_name='adamw',
    hyperparameters=(B1, B2, EPS, EPS_ROOT, MU_DTYPE, NESTEROV),
    slots=_adamw_slots, variants=_ALL,
    maths=ADAMW_MATHS.replace('AdamW', 'Adam').replace(r' + \lambda p', ''),
    references=ADAMW.references.split('\n')[1], optax='optax.adam',
)


def _lion_slots(v, count, count_inc):
  del count_inc
  return dict(
      learning_rate=base.value_at(v['learning_rate'], count),
      b1=v['b1'], one_minus_b1=hyperparams.one_minus(v['b1']),
      b2=v['b2'], one_minus_b2=hyperparams.one_minus(v['b2']),
      weight_decay=base.value_at(v['weight_decay'], count))


def _lion_update(s, g, p, decay, moments):
  direction = jnp.sign(s['one_minus_b1'] * g + s['b1'] * moments[0])
  m = s['one_minus_b2'] * g + s['b2'] * moments[0]
  if decay:
    direction = direction + s['weight_decay'] * p
  return -s['learning_rate'] * direction, [m]


LION = Family(
    name='lion', kernel='lion', title='Lion', state_words='momentum',
    hyperparameters=(
        B1.replace(check=_rate_or_one, doc='rate combining the gradient and '
                   'the momentum for the update.'),
        B2.replace(default=0.99, check=_rate_or_one,
                   doc='decay rate of the momentum.'),
        WEIGHT_DECAY.replace(default=1e-3), MASK),
    slots=_lion_slots, variants=_ALL,
    maths=r""":math:`u = -\eta(\mathrm{sign}((1-b_1) g + b_1 m) + \lambda p)`,
:math:`m \leftarrow (1-b_2) g + b_2 m`, as ``optax.lion``.""",
    references=(
        'Chen et al., `Symbolic Discovery of Optimization Algorithms '
        '<https://arxiv.org/abs/2302.06675>`_, 2023.'),
    example='learning_rate=1e-4, weight_decay=0.1', optax='optax.lion',
    reference_update=_lion_update,
)


def _ademamix_slots(v, count, count_inc):
  # optax evaluates the b3 and alpha schedules at the count before the step.
  b3 = base.value_at(v['b3'], count)
  return dict(
      learning_rate=base.value_at(v['learning_rate'], count),
      b1=v['b1'], one_minus_b1=hyperparams.one_minus(v['b1']),
      b2=v['b2'], one_minus_b2=hyperparams.one_minus(v['b2']), eps=v['eps'],
      weight_decay=base.value_at(v['weight_decay'], count),
      bias_correction1=hyperparams.bias_correction(v['b1'], count_inc),
      bias_correction2=hyperparams.bias_correction(v['b2'], count_inc),
      b3=b3, one_minus_b3=hyperparams.one_minus(b3),
      alpha=base.value_at(v['alpha'], count))


def _ademamix_update(s, g, p, decay, moments):
  m1 = s['one_minus_b1'] * g + s['b1'] * moments[0]
  m2 = s['one_minus_b3'] * g + s['b3'] * moments[1]
  v = s['one_minus_b2'] * (g * g) + s['b2'] * moments[2]
  direction = ((m1 * (1 / s['bias_correction1']) + s['alpha'] * m2)
               / (jnp.sqrt(v * (1 / s['bias_correction2'])) + s['eps']))
  if decay:
    direction = direction + s['weight_decay'] * p
  return -s['learning_rate'] * direction, [m1, m2, v]


ADEMAMIX = Family(
    name='ademamix', kernel='ademamix', title='AdEMAMix',
    state_words='three moments',
    hyperparameters=(
        B1.replace(doc='decay rate of the fast EMA.'), B2,
        Hyperparameter('b3', 0.9999, _SCHEDULE,
                       'decay rate of the slow EMA, or a schedule of it.',
                       hyperparam_checks.rate),
        Hyperparameter('alpha', 5.0, _SCHEDULE,
                       'weight of the slow EMA, or a schedule of it.',
                       hyperparam_checks.finite),
        EPS, WEIGHT_DECAY.replace(default=0.0), MASK),
    slots=_ademamix_slots, variants=_EIGHT_AND_PAGED,
    maths=r"""As ``optax.contrib.ademamix``: a fast EMA :math:`m_1` (rate
``b1``, bias-corrected), a slow EMA :math:`m_2` (rate ``b3``) and the
second moment :math:`v` (rate ``b2``, bias-corrected); :math:`u =
-\eta((\hat m_1 + \alpha m_2) / (\sqrt{\hat v} + \epsilon) + \lambda p)`.
``b3`` and ``alpha`` may be schedules of the step count (the warm-ups of
the paper), evaluated each step without recompiling.""",
    references=(
        'Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older '
        '<https://arxiv.org/abs/2409.03137>`_, 2024.'),
    example='learning_rate=1e-3, alpha=optax.linear_schedule(0.0, 5.0, 1000)',
    optax='optax.contrib.ademamix', reference_update=_ademamix_update,
)


def _sgd_slots(v, count, count_inc):
  del count_inc
  momentum = v['momentum']
  return dict(learning_rate=base.value_at(v['learning_rate'], count),
              momentum=0.0 if momentum is None else momentum,
              weight_decay=base.value_at(v['weight_decay'], count),
              nesterov=1.0 if v['nesterov'] else 0.0)


def _sgd_update(s, g, p, decay, moments):
  if decay:
    g = g + s['weight_decay'] * p
  m = g + s['momentum'] * moments[0]
  direction = jnp.where(s['nesterov'] != 0, g + s['momentum'] * m, m)
  return -s['learning_rate'] * direction, [m]


SGD = Family(
    name='sgd', kernel='sgd', title='SGD with heavy-ball momentum',
    state_words='momentum',
    hyperparameters=(
        MOMENTUM.replace(
            default=None, annotation='float | None',
            doc="the momentum decay rate, or None for none (optax's "
            "default; bitsandbytes' ``SGD8bit`` requires one, e.g. 0.9)."),
        L2_WEIGHT_DECAY,
        NESTEROV.replace(doc="Nesterov momentum, as ``optax.sgd``'s."),
        Hyperparameter(
            'accumulator_dtype', None, 'Any',
            "must be None: the momentum's storage is 8-bit blockwise (fp32 "
            "for small leaves); accepted for optax's spelling.",
            _must_be_none('the momentum'), keyword_only=True)),
    slots=_sgd_slots, variants=_EIGHT_ONLY,
    maths=r""":math:`m \leftarrow g + \lambda p + \mu m`, :math:`u = -\eta m`
(with ``nesterov``, :math:`u = -\eta (g + \lambda p + \mu m)` after the
moment's update): with ``weight_decay=0`` this is ``optax.sgd(learning_rate,
momentum, nesterov)``; weight decay is added to the gradient, as PyTorch
and bitsandbytes do for SGD. ``momentum=None`` (optax's default) is plain
SGD; the state still holds its one moment (1 byte a parameter), which then
carries nothing: without momentum ``optax.sgd`` needs no state at all.""",
    example='learning_rate=1e-2, momentum=0.9', optax='optax.sgd',
    reference_update=_sgd_update,
)


def _rmsprop_slots(v, count, count_inc):
  del count_inc
  return dict(learning_rate=base.value_at(v['learning_rate'], count),
              decay=v['decay'], one_minus_decay=hyperparams.one_minus(
                  v['decay']), eps=v['eps'])


def _rmsprop_update(s, g, p, decay, moments):
  del p, decay
  v = s['one_minus_decay'] * (g * g) + s['decay'] * moments[0]
  return -s['learning_rate'] * (g * (1 / jnp.sqrt(v + s['eps']))), [v]


RMSPROP = Family(
    name='rmsprop', kernel='rmsprop', title='RMSprop',
    state_words='second moment',
    hyperparameters=(
        Hyperparameter('decay', 0.9, 'float',
                       'decay rate of the second moment.',
                       hyperparam_checks.rate),
        EPS.replace(doc='added inside the square root.')),
    slots=_rmsprop_slots, variants=_EIGHT_ONLY,
    maths=r""":math:`v \leftarrow (1-d) g^2 + d v`, :math:`u = -\eta g /
\sqrt{v + \epsilon}`, as ``optax.rmsprop(learning_rate, decay, eps)``.""",
    optax='optax.rmsprop', reference_update=_rmsprop_update,
)


def _adagrad_slots(v, count, count_inc):
  del count_inc
  return dict(learning_rate=base.value_at(v['learning_rate'], count),
              eps=v['eps'])


def _adagrad_update(s, g, p, decay, moments):
  del p, decay
  total = g * g + moments[0]
  scale = jnp.where(total > 0, 1 / jnp.sqrt(total + s['eps']), 0.0)
  return -s['learning_rate'] * (scale * g), [total]


ADAGRAD = Family(
    name='adagrad', kernel='adagrad', title='Adagrad',
    state_words='sum of squares',
    hyperparameters=(
        Hyperparameter('initial_accumulator_value', 0.1, 'float',
                       'the value the sum of squares starts from.',
                       hyperparam_checks.non_negative),
        EPS.replace(default=1e-7, doc='added inside the square root.')),
    slots=_adagrad_slots, variants=_EIGHT_ONLY,
    maths=r""":math:`s \leftarrow s + g^2` from ``initial_accumulator_value``,
:math:`u = -\eta g / \sqrt{s + \epsilon}`, as ``optax.adagrad``.""",
    optax='optax.adagrad', reference_update=_adagrad_update,
    initial_values=lambda v: (v['initial_accumulator_value'],),
)

def _adabelief_slots(v, count, count_inc):
  return dict(
      learning_rate=base.value_at(v['learning_rate'], count),
      b1=v['b1'], one_minus_b1=hyperparams.one_minus(v['b1']),
      b2=v['b2'], one_minus_b2=hyperparams.one_minus(v['b2']),
      eps=v['eps'], eps_root=v['eps_root'],
      weight_decay=base.value_at(v['weight_decay'], count),
      bias_correction1=hyperparams.bias_correction(v['b1'], count_inc),
      bias_correction2=hyperparams.bias_correction(v['b2'], count_inc))


def _adabelief_update(s, g, p, decay, moments):
  m = s['one_minus_b1'] * g + s['b1'] * moments[0]
  gap = g - m
  v = s['one_minus_b2'] * (gap * gap) + s['b2'] * moments[1] + s['eps_root']
  direction = ((m * (1 / s['bias_correction1']))
               / (jnp.sqrt(v * (1 / s['bias_correction2'])) + s['eps']))
  if decay:
    direction = direction + s['weight_decay'] * p
  return -s['learning_rate'] * direction, [m, v]


ADABELIEF = Family(
    name='adabelief', kernel='adabelief', title='AdaBelief',
    hyperparameters=(
        B1, B2.replace(doc='exponential decay rate of the second moment, the '
                       "gradient's squared gap from its prediction."),
        EPS.replace(default=1e-16), EPS_ROOT.replace(
            default=1e-16, keyword_only=False,
            doc="added to the second moment at every step, as "
            "``optax.adabelief``'s ``eps_root``."),
        WEIGHT_DECAY.replace(default=0.0, keyword_only=True),
        MASK.replace(keyword_only=True)),
    slots=_adabelief_slots, variants=_EIGHT_AND_PAGED,
    maths=r"""As ``optax.adabelief``, with decoupled weight decay: the step
divides the first moment :math:`m` by the root of :math:`s`, the moving
average of the squared gap between the gradient and :math:`m` (the
"belief" in the gradient), instead of the gradient's square:
:math:`m \leftarrow (1-b_1) g + b_1 m`, :math:`s \leftarrow (1-b_2)
(g-m)^2 + b_2 s + \epsilon_{root}`, :math:`u = -\eta\,(\hat m /
(\sqrt{\hat s} + \epsilon) + \lambda p)`, bias-corrected as Adam's.
Nesterov momentum is not offered.""",
    references=(
        'Zhuang et al., `AdaBelief Optimizer: Adapting Stepsizes by the '
        'Belief in Observed Gradients <https://arxiv.org/abs/2010.07468>`_, '
        '2020.'),
    optax='optax.adabelief', reference_update=_adabelief_update,
)

TRUST_RATIO = Hyperparameter(
    'trust_ratio', trust_ratio.OPTAX, 'str',
    "``'optax'`` or ``'bitsandbytes'`` (see above).", keyword_only=True)
# bitsandbytes' LAMB: updates at most as long as their parameters.
LAMB_BITSANDBYTES_MAX_UNORM = 1.0


def _lamb_spec(v):
  """Adam's kernel at learning rate 1, the trust ratio applied after it.

  Both ratios leave Adam's moments alone, so the state (and a checkpoint)
  is the same whichever is chosen.
  """
  if v['trust_ratio'] == trust_ratio.OPTAX:
    trust = trust_ratio.TrustRatio(v['learning_rate'], v['weight_decay'],
                                   kind=trust_ratio.OPTAX)
  else:
    max_unorm = v['max_unorm']
    trust = trust_ratio.TrustRatio(
        v['learning_rate'], v['weight_decay'],
        LAMB_BITSANDBYTES_MAX_UNORM if max_unorm is None else max_unorm,
        kind=trust_ratio.BITSANDBYTES)
  kernel_values = dict(v, learning_rate=1.0, weight_decay=0.0)
  return _plain_spec(LAMB, kernel_values)._replace(trust_ratio=trust)


LAMB = Family(
    name='lamb', kernel='adamw', title='LAMB',
    hyperparameters=(
        B1, B2,
        EPS.replace(default=1e-6, doc="added to the denominator for "
                    "numerical stability (optax's 1e-6; bitsandbytes' is "
                    '1e-8).'),
        WEIGHT_DECAY.replace(default=0.0), MASK, TRUST_RATIO,
        Hyperparameter(
            'max_unorm', None, 'float | None',
            "with ``trust_ratio='bitsandbytes'`` only: the largest update "
            "norm, relative to the parameter norm (bitsandbytes' default, "
            '1.0; 0 turns the clipping off: Adam).', keyword_only=True),
        EPS_ROOT.replace(doc="added inside the square root, as "
                         "``optax.lamb``'s.")),
    slots=_adamw_slots, variants=_EIGHT_AND_PAGED,
    maths=r"""Adam's direction :math:`d = \hat m / (\sqrt{\hat v} +
\epsilon)`, with decoupled weight decay, scaled per tensor by a trust
ratio. Two ratios:

- ``trust_ratio='optax'`` (the default): ``optax.lamb``'s,
  :math:`u = -\eta\, r \|p\| / \|r\|` with :math:`r = d + \lambda p` (no
  scaling where either norm is 0): every tensor moves by :math:`\eta`
  times its own norm.
- ``trust_ratio='bitsandbytes'``: bitsandbytes' ``LAMB8bit``, which clips
  but never enlarges: :math:`u = -\eta (s d + \lambda p)`, :math:`s =
  \min(1, \mathrm{max\_unorm} \|p\| / \|d\|)`; a tensor whose norm is 0 is
  not scaled (bitsandbytes would never move it). bitsandbytes multiplies
  the parameter by :math:`1 - \eta\lambda` after the step; the decay here
  is added to the update, which differs by :math:`\eta^2 \lambda s d`.""",
    notes="""optax's is the default because this is an optax library whose
factories mean their optax namesakes: code moving from ``optax.lamb``
changes only the name (``eps`` is optax's 1e-6 too). bitsandbytes' ratio
stops short of the optimum where Adam's direction is shorter than the
parameter (optax's parabola test ends at (1.00, 1.28, 1.00) instead of (1,
-1, 1)). Code moving from bitsandbytes passes ``trust_ratio='bitsandbytes'``
(and ``eps=1e-8``, its default). The moments are Adam's under either ratio,
so a checkpoint restores under either. Its 8-bit LAMB quantizes whole
tensors; these moments are blockwise, as its other 8-bit optimizers'.""",
    references=(
        'You et al., `Large Batch Optimization for Deep Learning: Training '
        'BERT in 76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.'),
    example='learning_rate=1e-3, weight_decay=0.01', optax='optax.lamb',
    spec=_lamb_spec,
    check=lambda v: trust_ratio.check_kind(
        'lamb', v['trust_ratio'], v['max_unorm'], {}),
)

# optax.lars's defaults.
LARS_TRUST_COEFFICIENT = 0.001
LARS_EPS = 0.0
# bitsandbytes' LARS: updates at most 2% of their parameters' norm.
LARS_BITSANDBYTES_MAX_UNORM = 0.02


def _lars_spec(v):
  """SGD-momentum's kernel at learning rate 1, the trust ratio around it.

  optax's ratio scales the gradient before the kernel's momentum, whose
  state then holds scaled gradients: it has its own name ('lars_optax'),
  so that a checkpoint of one never restores into the other.
  """
  kernel_values = dict(v, learning_rate=1.0)
  if v['trust_ratio'] == trust_ratio.OPTAX:
    coefficient, eps = v['trust_coefficient'], v['eps']
    return _plain_spec(LARS, dict(kernel_values, weight_decay=0.0))._replace(
        name='lars_optax',
        trust_ratio=trust_ratio.TrustRatio(
            v['learning_rate'], v['weight_decay'], kind=trust_ratio.OPTAX,
            trust_coefficient=(LARS_TRUST_COEFFICIENT if coefficient is None
                               else coefficient),
            eps=LARS_EPS if eps is None else eps, before_kernel=True,
            mask=v['trust_ratio_mask']))
  max_unorm = v['max_unorm']
  return _plain_spec(LARS, kernel_values)._replace(
      trust_ratio=trust_ratio.TrustRatio(
          v['learning_rate'], 0.0,
          LARS_BITSANDBYTES_MAX_UNORM if max_unorm is None else max_unorm,
          kind=trust_ratio.BITSANDBYTES, mask=v['trust_ratio_mask']))


LARS = Family(
    name='lars', kernel='sgd', title='LARS', state_words='momentum',
    hyperparameters=(
        MOMENTUM, L2_WEIGHT_DECAY,
        MASK.replace(doc='which parameters get weight decay (e.g. not biases '
                     'and norms), a tree of booleans or a callable, as '
                     "``optax.lars``'s ``weight_decay_mask``."),
        TRUST_RATIO,
        Hyperparameter(
            'trust_coefficient', None, 'float | None',
            "with ``trust_ratio='optax'`` only: the ratio's multiplier (None "
            "for optax's 0.001).", keyword_only=True),
        Hyperparameter(
            'eps', None, 'float | None',
            "with ``trust_ratio='optax'`` only: added to the norm the ratio "
            "divides by (None for optax's 0).", keyword_only=True),
        Hyperparameter(
            'trust_ratio_mask', None, 'Any',
            "which parameters are scaled by the ratio, as ``optax.lars``'s "
            '(None for all); the others take the plain SGD step.',
            keyword_only=True),
        NESTEROV.replace(doc="Nesterov momentum, as ``optax.lars``'s."),
        Hyperparameter(
            'max_unorm', None, 'float | None',
            "with ``trust_ratio='bitsandbytes'`` only: the largest update "
            "norm, relative to the parameter norm (None for bitsandbytes' "
            '0.02; 0 turns the clipping off: SGD).', keyword_only=True)),
    slots=_sgd_slots, variants=_EIGHT_AND_PAGED,
    maths=r"""SGD with heavy-ball momentum and L2 weight decay, scaled per
tensor by a trust ratio. Two ratios:

- ``trust_ratio='optax'`` (the default): ``optax.lars``'s. The gradient
  plus decay, :math:`r = g + \lambda p`, is scaled by :math:`c \|p\| /
  (\|r\| + \epsilon)` (not where either norm is 0) and by the learning
  rate *before* the momentum: :math:`m \leftarrow \eta\, c \|p\| r /
  (\|r\| + \epsilon) + \mu m`, :math:`u = -m`.
- ``trust_ratio='bitsandbytes'``: bitsandbytes' ``LARS8bit``. The
  momentum is of the raw gradient plus decay, :math:`m \leftarrow r +
  \mu m`, and the step is clipped after it: :math:`u = -\eta s m`,
  :math:`s = \min(1, \mathrm{max\_unorm} \|p\| / \|m\|)`; a tensor whose
  norm is 0 is not scaled (bitsandbytes would never move it).""",
    notes="""optax's is the default because this is an optax library whose
factories mean their optax namesakes (its trust coefficient, 0.001, and
``eps``, 0, are optax's too); bitsandbytes' clip stops short of the optimum
where the momentum is shorter than the limit (optax's Rosenbrock test ends
at (0.90, 0.81) instead of (1, 1)). Code moving from bitsandbytes passes
``trust_ratio='bitsandbytes'``. The two momenta differ (optax's holds scaled
gradients), so a checkpoint restores only under the ratio that wrote it.
The positional order is bitsandbytes' (``momentum`` second); pass optax's
other arguments by keyword.""",
    references=(
        'You, Gitman & Ginsburg, `Large Batch Training of Convolutional '
        'Networks <https://arxiv.org/abs/1708.03888>`_, 2017.'),
    example='learning_rate=0.1, weight_decay=1e-4', optax='optax.lars',
    spec=_lars_spec,
    check=lambda v: trust_ratio.check_kind(
        'lars', v['trust_ratio'], v['max_unorm'],
        {'trust_coefficient': v['trust_coefficient'], 'eps': v['eps']}),
)

FAMILIES = {family.name: family for family in (
    ADAMW, ADAM, LION, ADEMAMIX, SGD, RMSPROP, ADAGRAD, LAMB, LARS,
    ADABELIEF)}


def _plain_spec(family: Family, values) -> transform.OptimizerSpec:
  def hyperparams_at(count, count_inc):
    return hyperparams.pack(family.kernel,
                            **family.slots(values, count, count_inc))

  initial = family.initial_values(values) if family.initial_values else ()
  return transform.OptimizerSpec(
      name=family.state_name or family.name, hyperparams=hyperparams_at,
      initial_values=initial, kernel=family.kernel)


def spec_of(family: Family, values) -> transform.OptimizerSpec:
  """The ``transform.OptimizerSpec`` of ``family`` with these arguments."""
  return family.spec(values) if family.spec else _plain_spec(family, values)


def spec(name: str, learning_rate, **arguments) -> transform.OptimizerSpec:
  """The spec family ``name``'s factories build from these arguments.

  Arguments not given take the factories' defaults.
  """
  family = FAMILIES[name]
  values = {h.name: h.default for h in family.hyperparameters}
  unknown = set(arguments) - set(values)
  if unknown:
    raise TypeError(f'{name}: no arguments {sorted(unknown)}.')
  values.update(arguments, learning_rate=learning_rate)
  return spec_of(family, values)


def reference_update(kernel: str):
  """The ``jax.numpy`` element update of kernel ``kernel``."""
  return next(family.reference_update for family in FAMILIES.values()
              if family.name == kernel)
