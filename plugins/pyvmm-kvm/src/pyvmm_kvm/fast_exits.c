/*
 * The compiled exit path of pyvmm-kvm (the module pyvmm_kvm._fast_exits).
 *
 * fx_run() enters the guest with KVM_RUN and answers, without returning to
 * Python, every port or MMIO exit that hits a register the VMM asked the
 * backend to serve (pyvmm.served_io: a constant, latched bytes, the ACPI PM
 * timer).  It returns at the first exit it does not serve, with the exit left
 * in kvm_run for the Python decoder, exactly as a bare KVM_RUN would.
 *
 * Why: on a software KVM every return to user space costs several microseconds
 * of refilled TLB and caches, and the Python interpreter touches far more
 * memory per exit than a C loop; an exit answered here touches a few cache
 * lines.  The semantics of each register are the same as the pure-Python
 * path's (pyvmm_kvm.served), which the tests run side by side.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define FX_PORT 0
#define FX_MMIO 1
#define FX_CONSTANT 1
#define FX_LATCH 2
#define FX_PM_TIMER 3
#define FX_MAX_RANGES 32
#define FX_PM_TIMER_HZ 3579545u
#define FX_PM_TIMER_MASK 0xffffffu

struct fx_range {
	uint64_t base;
	uint64_t size;
	uint64_t value;
	uint8_t *latch;
	uint8_t space;
	uint8_t kind;
};

struct fx_table {
	uint32_t count;
	struct fx_range ranges[FX_MAX_RANGES];
};

/* The PM timer's 24-bit count: the same arithmetic as pyvmm.devices.acpi_pm
 * (time.monotonic_ns is CLOCK_MONOTONIC); 128 bits so the product never wraps. */
static uint64_t pm_timer(uint64_t start_ns)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	uint64_t ns = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
	unsigned __int128 ticks = (unsigned __int128)(ns - start_ns) * FX_PM_TIMER_HZ / 1000000000u;
	return (uint64_t)ticks & FX_PM_TIMER_MASK;
}

static const struct fx_range *find(const struct fx_table *table, uint32_t count, uint8_t space, uint64_t address)
{
	for (uint32_t i = 0; i < count; i++) {
		const struct fx_range *r = &table->ranges[i];
		if (r->space == space && address - r->base < r->size)
			return r;
	}
	return NULL;
}

/* One access of `size` bytes at `offset` in range `r`: 1 when served (a read's
 * value stored little-endian in `data`), 0 when it belongs to the VMM. */
static int serve(const struct fx_range *r, uint64_t offset, uint32_t size, int is_write, uint8_t *data)
{
	uint64_t value;
	switch (r->kind) {
	case FX_CONSTANT:
		if (is_write)
			return 1;
		value = r->value;
		break;
	case FX_LATCH:
		if (is_write) {
			r->latch[offset] = data[0];
			return 1;
		}
		value = r->latch[offset];
		break;
	case FX_PM_TIMER:
		if (is_write || size != 4)
			return 0;
		value = pm_timer(r->value);
		break;
	default:
		return 0;
	}
	for (uint32_t i = 0; i < size; i++)
		data[i] = (uint8_t)(i < 8 ? value >> (8 * i) : 0);
	return 1;
}

static int serve_io(struct kvm_run *run, const struct fx_table *table, uint32_t count)
{
	const struct fx_range *r = find(table, count, FX_PORT, run->io.port);
	if (r == NULL)
		return 0;
	/* A string access is `count` accesses of `size` bytes: the decision is
	 * the same for each, so the first tells whether all are served. */
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	int is_write = run->io.direction == KVM_EXIT_IO_OUT;
	for (uint32_t i = 0; i < run->io.count; i++)
		if (!serve(r, run->io.port - r->base, run->io.size, is_write, data + i * run->io.size))
			return 0;
	return 1;
}

int fx_run(int fd, void *page, struct fx_table *table, uint64_t *served)
{
	struct kvm_run *run = page;
	for (;;) {
		if (ioctl(fd, KVM_RUN, 0) < 0)
			return -errno;
		/* Ranges are only ever appended, the entry before the count. */
		uint32_t count = __atomic_load_n(&table->count, __ATOMIC_ACQUIRE);
		if (run->exit_reason == KVM_EXIT_IO) {
			if (!serve_io(run, table, count))
				return 0;
		} else if (run->exit_reason == KVM_EXIT_MMIO) {
			const struct fx_range *r = find(table, count, FX_MMIO, run->mmio.phys_addr);
			if (r == NULL || !serve(r, run->mmio.phys_addr - r->base, run->mmio.len, run->mmio.is_write,
						run->mmio.data))
				return 0;
		} else {
			return 0;
		}
		*served += 1;
	}
}
