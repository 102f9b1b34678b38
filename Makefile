# relaynet — the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: all venv bytecode peers demo typecheck test test-fast bench clean distclean

all: venv

# The virtualenv with relaynet installed in development mode (compat mode puts
# the source tree on sys.path, so twistd finds twisted/plugins/relaynet_plugin.py).
# One line per slow step says what it is doing; the tools themselves stay quiet.
$(STAMP): setup.cfg pyproject.toml
	@echo "make: creating the virtualenv $(VENV) ($(PYTHON) -m venv) ..."
	@$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip in $(VENV) (pip) ..."
	@$(PY) -m pip install -q --upgrade pip
	@echo "make: installing relaynet and its test dependencies into $(VENV) (pip, about a minute) ..."
	@$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "make: $(VENV) is ready: run relaynet as $(VENV)/bin/relaynet, or '. $(VENV)/bin/activate' first"

venv: $(STAMP)

# The bytecode of relaynet/ and the twistd plugin, compiled as pip compiles an
# installed package (an editable install is not). Python would write it on
# first import, but not where PYTHONDONTWRITEBYTECODE is set (some CI images):
# then every node a test or the bench starts compiled every module again
# (0.3 s of CPU per start, about 4 MiB more memory per node). Only changed
# files are compiled; __pycache__ is ignored by git.
bytecode: venv
	@$(PY) -m compileall -q -j 0 relaynet twisted/plugins

# Real peers for interop tests and benchmarks: Debian's postfix (smtp-source,
# smtp-sink) and swaks, with Net::SSLeay for swaks --tls (docs/interop.md);
# fuse3 (fusermount3, libfuse3) for powerfs, the power-loss file system of
# tests/test_powerloss.py and 'lab up --power-fs' (docs/power-loss.md); nsd
# (NSD, an authoritative DNS server) and ldnsutils (drill, a DNS client) for
# MX delivery against real DNS on loopback (tests/test_mx_dns.py).
# No system MTA gets configured ("No configuration"). No system DNS server
# may run either: nsd's postinst would start NSD at once (invoke-rc.d, on
# port 53 of every address) and enable it at boot. A policy-rc.d that exits
# 101 ("action forbidden", honoured by invoke-rc.d and deb-systemd-invoke)
# stops the start; it is created only if there is none (Docker images ship
# one) and removed afterwards, also on failure. policy-rc.d does not stop the
# enabling (update-rc.d defaults, deb-systemd-helper enable), so a freshly
# installed nsd is disabled right after. The tests run their own NSD in the
# foreground on a private port (harness/dns.py). dovecot-core and
# dovecot-lmtpd: a real LMTP server for LMTP delivery (tests/test_lmtp.py
# runs its own Dovecot in the foreground with a private config); its
# postinst would start the system Dovecot and enable it: the same
# policy-rc.d stops the start, and a freshly installed dovecot is disabled.
# sasl2-bin (saslpasswd2) and libsasl2-modules: Cyrus SASL for a private Postfix
# with AUTH (tests/test_smarthost_auth.py: a private sasldb; saslauthd unused).
# opendkim and opendkim-tools: OpenDKIM, the verifier of relaynet's DKIM
# signatures that shares no code with the signer (tests/test_dkim_interop.py
# runs its own, with a private config). unbound: a DNSSEC-validating resolver
# for DANE (tests run their own on a private port). Both postinsts would
# start and enable a system service: the same policy-rc.d stops the start,
# and freshly installed ones are disabled, as nsd.
PEERS_APT := postfix swaks libnet-ssleay-perl fuse3 nsd ldnsutils dovecot-core dovecot-lmtpd sasl2-bin libsasl2-modules opendkim opendkim-tools unbound
POLICY_RC := /usr/sbin/policy-rc.d
peers:
	@if command -v postfix >/dev/null && command -v smtp-source >/dev/null && command -v swaks >/dev/null && perl -MNet::SSLeay -e1 2>/dev/null && command -v fusermount3 >/dev/null && command -v nsd >/dev/null && command -v drill >/dev/null && command -v dovecot >/dev/null && [ -x /usr/lib/dovecot/lmtp ] && command -v saslpasswd2 >/dev/null && ls /usr/lib/*/sasl2/libplain.so >/dev/null 2>&1 && command -v opendkim >/dev/null && command -v opendkim-testmsg >/dev/null && command -v unbound >/dev/null; then \
	  echo "peers: postfix, smtp-source, smtp-sink, swaks (with TLS), fuse3, nsd, drill, dovecot (LMTP), Cyrus SASL (saslpasswd2, PLAIN/LOGIN), opendkim and unbound are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing $(PEERS_APT) (apt-get update, apt-get install; the system Postfix stays unconfigured, the system NSD, Dovecot, OpenDKIM and Unbound neither started nor enabled) ..."; \
	  had_nsd=; dpkg-query -W -f='$${Status}' nsd 2>/dev/null | grep -q ' installed$$' && had_nsd=1; \
	  had_dovecot=; dpkg-query -W -f='$${Status}' dovecot-core 2>/dev/null | grep -q ' installed$$' && had_dovecot=1; \
	  had_opendkim=; dpkg-query -W -f='$${Status}' opendkim 2>/dev/null | grep -q ' installed$$' && had_opendkim=1; \
	  had_unbound=; dpkg-query -W -f='$${Status}' unbound 2>/dev/null | grep -q ' installed$$' && had_unbound=1; \
	  if [ ! -e $(POLICY_RC) ]; then \
	    trap 'rm -f $(POLICY_RC)' EXIT; trap 'exit 130' INT TERM HUP; \
	    printf '#!/bin/sh\n# make peers: no service starts while it installs packages\nexit 101\n' >$(POLICY_RC) && chmod 755 $(POLICY_RC); \
	  fi; \
	  apt-get update -qq && \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PEERS_APT) >/dev/null; \
	  rc=$$?; \
	  if [ "$$rc" = 0 ] && [ -z "$$had_nsd" ]; then \
	    update-rc.d nsd disable >/dev/null 2>&1 || true; \
	    deb-systemd-helper disable nsd.service >/dev/null 2>&1 || true; \
	  fi; \
	  if [ "$$rc" = 0 ] && [ -z "$$had_dovecot" ]; then \
	    update-rc.d dovecot disable >/dev/null 2>&1 || true; \
	    deb-systemd-helper disable dovecot.service dovecot.socket >/dev/null 2>&1 || true; \
	  fi; \
	  if [ "$$rc" = 0 ] && [ -z "$$had_opendkim" ]; then \
	    update-rc.d opendkim disable >/dev/null 2>&1 || true; \
	    deb-systemd-helper disable opendkim.service >/dev/null 2>&1 || true; \
	  fi; \
	  if [ "$$rc" = 0 ] && [ -z "$$had_unbound" ]; then \
	    update-rc.d unbound disable >/dev/null 2>&1 || true; \
	    deb-systemd-helper disable unbound.service unbound-resolvconf.service >/dev/null 2>&1 || true; \
	  fi; \
	  if [ "$$rc" != 0 ]; then echo "peers: apt-get failed (exit $$rc)" >&2; exit "$$rc"; fi; \
	  echo "peers: installed $(PEERS_APT)"; \
	else \
	  echo "peers: not root or no apt-get: install $(PEERS_APT) yourself; tests needing them will be skipped" >&2; \
	fi

demo: venv bytecode
	$(PY) -m relaynet.demo $(DEMO_ARGS)

# Static types: mypy over relaynet/ and the twistd plugin, as configured in
# pyproject.toml [tool.mypy]. `make test` runs it first: a type error fails it.
typecheck: venv
	@echo "make: type-checking relaynet/ (mypy --strict) ..."
	$(PY) -m mypy

test: venv typecheck peers bytecode
	@echo "make: running the test suite (pytest) ..."
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv bytecode
	$(PY) -m pytest -q -m "not slow" tests

bench: venv peers bytecode
	@echo "make: installing the benchmark dependencies into $(VENV) (pip) ..."
	$(PY) -m pip install -q -e '.[bench]' --config-settings editable_mode=compat
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf var build *.egg-info .pytest_cache .hypothesis .mypy_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
