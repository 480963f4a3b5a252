# apikey: PGXS build
MODULE_big = apikey
OBJS = \
	apikey.o \
	src/address.o \
	src/audit.o \
	src/binding.o \
	src/canary.o \
	src/detector.o \
	src/events.o \
	src/failurelimit.o \
	src/flushers.o \
	src/hash.o \
	src/invalidation.o \
	src/issue.o \
	src/keycache.o \
	src/keystore.o \
	src/leak.o \
	src/legacy.o \
	src/legacyupgrade.o \
	src/networks.o \
	src/netwatch.o \
	src/ownerlimits.o \
	src/ownersql.o \
	src/quota.o \
	src/ratelimit.o \
	src/redact.o \
	src/retention.o \
	src/shmem.o \
	src/stats.o \
	src/support.o \
	src/throttle.o \
	src/token.o \
	src/usage.o \
	src/verdict.o \
	src/verify.o \
	src/worker.o

EXTENSION = apikey
DATA = $(wildcard apikey--*.sql)
PGFILEDESC = "apikey - API keys kept in the database"

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers

# Regression and isolation tests run in a throwaway server that pg_regress
# starts with apikey preloaded (apikey.conf), listening on 127.0.0.1 so that
# connection addresses are real, and `make installcheck` works
# from a plain checkout after `make install`.  One file per feature.
REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --inputdir=. --load-extension=pgcrypto \
	--temp-config=$(srcdir)/apikey.conf --temp-instance=./tmp_check_regress --host=127.0.0.1
ISOLATION = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --inputdir=. \
	--temp-config=$(srcdir)/apikey.conf --temp-instance=./tmp_check_iso --host=127.0.0.1
TAP_TESTS = 1

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# src/hash.c calls OpenSSL directly where the server is built with it
SHLIB_LINK += $(filter -lcrypto, $(LIBS))

# TAP tests share t/ApikeyTest.pm; prove runs in the source directory.
PG_PROVE_FLAGS += -I t

# The TAP tests alone (installcheck runs them after the pg_regress suites).
.PHONY: prove_installcheck
prove_installcheck:
	$(prove_installcheck)

# PGXS tracks no header dependencies: every object depends on every header.
$(OBJS): $(wildcard src/*.h)

EXTRA_CLEAN = fuzz/fuzz_token fuzz/*.o tmp_check_regress tmp_check_iso
