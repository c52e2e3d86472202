"""Built-in backends. Importing this package registers them (cheaply: heavy imports stay lazy)."""

from engines.backends import classical as classical
