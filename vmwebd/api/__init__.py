"""The SOAP layer (spyne): the user API, the peer endpoint and our hardened stack.

Importing this package first puts spyne's compatibility fixes that must precede its first import
in place (see :mod:`vmwebd.api.compat`)."""

from vmwebd.api import compat

compat.prepare_imports()
