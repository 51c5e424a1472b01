"""Linux host pieces shared by every Linux backend: cgroups (``_cgroups``), the
seccomp compiler (``_seccomp``), per-box host identities (``_identity``),
workdir mounts and workspace images (``_workdir``), host facts (``_facts``)
and the doctor's checks (``_checks``). Private modules: the public surface is
``corral.backends``."""
