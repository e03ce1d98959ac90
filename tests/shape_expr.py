"""A stand-in for TensorRT's symbolic shape expressions, shared by the plugin tests."""


class Sym:
    """+, -, * and // with ints or Syms, nothing else (no reflected operators, comparisons,
    bool() or int(), as TensorRT's ``SymInt32``); evaluated later with :func:`evaluate`."""

    def __init__(self, fn):
        self.fn = fn

    @classmethod
    def var(cls, name):
        return cls(lambda env: env[name])

    def _op(self, other, op):
        if not isinstance(other, (Sym, int)):
            raise TypeError(f"shape expressions combine only with ints, got {type(other)}")
        rhs = other.fn if isinstance(other, Sym) else (lambda env, v=other: v)
        return Sym(lambda env: op(self.fn(env), rhs(env)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError("a shape expression has no truth value")

    __radd__ = __rsub__ = __rmul__ = __rfloordiv__ = None
    __lt__ = __le__ = __gt__ = __ge__ = __int__ = __index__ = None


def evaluate(value, env: dict) -> int:
    """An int, or a Sym's value for the sizes in ``env``."""
    return value.fn(env) if isinstance(value, Sym) else value
