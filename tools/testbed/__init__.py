"""Test beds: real upstream KVM inside a Linux guest that QEMU emulates (TCG).

This machine's ``/dev/kvm`` is a software KVM, and there is no arm64 KVM at all.
A bed boots a stock Debian 12 kernel under ``qemu-system-aarch64`` (``virt`` with
virtualization=on: KVM in VHE, nVHE or protected mode) or ``qemu-system-x86_64``
(``q35``, an EPYC CPU: ``kvm_amd`` with nested paging) with an initramfs of
Debian's Python 3.11, the checkout's pyvmm wheels and their PyPI dependencies,
runs a pytest selection there with ``--pyvmm-backend kvm`` and brings back its
exit status and junit report over the serial console.

Usage, from the checkout's ``tools`` directory (or with it on PYTHONPATH)::

    python3 -m testbed arm64 [--mode vhe|nvhe|protected] [--cpus N] [PATHS...] [-- PYTEST ARGS]
    python3 -m testbed amd64 [PATHS...] [-- PYTEST ARGS]

    python3 -m testbed amd64 --command 'python3.11 -m pyvmm backends'

    options: --timeout SECONDS (hard, default 1800), --cache-dir DIR (default
    ~/.cache/pyvmm-testbed or $PYVMM_TESTBED_CACHE), --junit FILE, --quiet,
    --command SHELL (run it in the guest instead of pytest: a look around)
    --keep N (cache entries kept per kind after the run, default 2), --no-prune

    python3 -m testbed prune [--keep N] [--dry-run] [--cache-dir DIR]

PATHS are test paths in the checkout, before or after the options (default: the
bed's own, ``Arch.default_selection``: on amd64 ``plugins/pyvmm-kvm/tests`` and
``tools/testbed/guest_tests``); the conformance suite is added by
``--pyvmm-backend kvm`` itself.  Exit status 0 when
the guest's pytest passed, 1 when it failed, 2 when the bed could not run (QEMU
or a package missing, the guest did not finish in time, KVM not in the mode asked).

Needs: ``qemu-system-arm`` / ``qemu-system-x86`` (Debian 12: QEMU 7.2), apt-get and
dpkg-deb with Debian's sources configured, pip with PyPI.  The image is built in
the cache on first use (a minute or two) and reused while the Debian package
versions and the checkout's requirements stay the same.  Each run holds a shared
lock on the cache (``cachelock``) and then prunes it: per kind (checkout layer, base,
anchor, wheels, each Debian package) it keeps what the run used and the most recently
used up to ``--keep``, never what was used in the last hour, never a link out of
the cache, and nothing while another run holds the lock (``prune``).  The host-side pytest
tests are ``tools/testbed/tests`` (tox envs ``kvm-arm64`` and ``kvm-amd``).
"""
