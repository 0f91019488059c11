"""One hierarchy of errors for vmweb.

Every error carries a SOAP faultcode (``Client.*`` when the caller asked for something wrong,
``Server.*`` when we could not do it) and a message that names the object concerned. The SOAP
layer turns them into faults, the CLI into one line and a non-zero exit.
"""


class VmwebError(Exception):
    """Base of every error vmweb reports to a user or a program."""

    faultcode = "Server.Internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- caller's mistakes -------------------------------------------------------------------------
class ClientError(VmwebError):
    faultcode = "Client"


class InvalidArgument(ClientError):
    """An argument has the wrong type, range or form; the message names the field."""

    faultcode = "Client.InvalidArgument"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NoSuchCluster(ClientError):
    faultcode = "Client.NoSuchCluster"

    def __init__(self, name: str):
        super().__init__(f"no virtual cluster named {name!r}")
        self.name = name


class NoSuchVm(ClientError):
    faultcode = "Client.NoSuchVm"

    def __init__(self, cluster: str, vm: str):
        super().__init__(f"virtual cluster {cluster!r} has no VM named {vm!r}")


class ConsoleUnavailable(VmwebError):
    """A VM's console cannot be had (not running, not reachable, no console); names the VM."""

    faultcode = "Server.ConsoleUnavailable"

    def __init__(self, vm_id: str, why: str):
        super().__init__(f"the console of VM {vm_id} is not available: {why}")
        self.vm_id, self.why = vm_id, why


class NoSuchTemplate(ClientError):
    faultcode = "Client.NoSuchTemplate"

    def __init__(self, name: str, known=()):
        hint = f" (known: {', '.join(sorted(known))})" if known else ""
        super().__init__(f"no scenario template named {name!r}{hint}")
        self.name = name


class NoSuchHost(ClientError):
    faultcode = "Client.NoSuchHost"

    def __init__(self, host: str):
        super().__init__(f"no host named {host!r}")


class NoSuchSetting(ClientError):
    faultcode = "Client.NoSuchSetting"

    def __init__(self, key: str, known=()):
        hint = f" (known: {', '.join(sorted(known))})" if known else ""
        super().__init__(f"no setting named {key!r}{hint}")


class NameTaken(ClientError):
    faultcode = "Client.NameTaken"

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} name {name!r} is already taken")
        self.name = name


class MalformedRequest(ClientError):
    """The request could not be parsed (not XML, not SOAP, forbidden constructs)."""

    faultcode = "Client.MalformedRequest"


class RequestTooLarge(ClientError):
    faultcode = "Client.RequestTooLarge"


class NotAuthorized(ClientError):
    faultcode = "Client.NotAuthorized"


class NoSuchUser(ClientError):
    faultcode = "Client.NoSuchUser"

    def __init__(self, name: str):
        super().__init__(f"no user named {name!r}")


class NoSuchSshKey(ClientError):
    faultcode = "Client.NoSuchSshKey"

    def __init__(self, user: str, key: str):
        super().__init__(f"user {user!r} has no SSH key {key[:80]!r}")


class SshKeyExists(ClientError):
    faultcode = "Client.SshKeyExists"

    def __init__(self, user: str, fingerprint: str):
        super().__init__(f"user {user!r} already has the SSH key {fingerprint}")


class NoSuchImage(ClientError):
    faultcode = "Client.NoSuchImage"

    def __init__(self, name: str):
        super().__init__(f"no base image named {name!r}")
        self.name = name


class NoSuchMigration(ClientError):
    faultcode = "Client.NoSuchMigration"

    def __init__(self, mid: str):
        super().__init__(f"no migration {mid!r}")


class MigrationBusy(ClientError):
    """The VM is already being moved (its ``migration/<vm>`` lease is held)."""

    faultcode = "Client.MigrationBusy"


class HostAlive(ClientError):
    """Evacuating a host that this host does not believe dead (its VMs may still run there)."""

    faultcode = "Client.HostAlive"


# -- our side ----------------------------------------------------------------------------------
class ServerError(VmwebError):
    faultcode = "Server"


class PoolExhausted(ServerError):
    faultcode = "Server.PoolExhausted"

    def __init__(self, pool: str, wanted: int, free: int):
        super().__init__(f"address pool {pool!r} has {free} free addresses, {wanted} needed")
        self.pool = pool


class NoCapacity(ServerError):
    faultcode = "Server.NoCapacity"


class QuotaExceeded(ClientError):
    """A create or scale would take an owner over their quota of VMs; names user, quota and request."""

    faultcode = "Client.QuotaExceeded"


class NoQuorum(ServerError):
    faultcode = "Server.NoQuorum"


class HypervisorError(ServerError):
    """A hypervisor operation failed; the message names the operation and the object."""

    faultcode = "Server.Hypervisor"


class NoSuchDomain(HypervisorError):
    faultcode = "Server.Hypervisor.NoSuchDomain"


class ImageUnavailable(ServerError):
    """A host needs a base image that no live host can give it, or a copy failed its hash."""

    faultcode = "Server.ImageUnavailable"


class StoreError(ServerError):
    faultcode = "Server.Store"


class ConfigError(VmwebError):
    """A configuration file is wrong: names the file, the line and the field."""

    faultcode = "Server.Config"

    def __init__(self, path: str, line: int | None, field: str, message: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {field}: {message}")
        self.path, self.line, self.field = path, line, field


class CertificateError(VmwebError):
    """A cluster CA or host credential file is missing, unreadable, expired, not issued by the
    cluster CA, or would be overwritten; the message names the file."""

    faultcode = "Server.Certificate"

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
