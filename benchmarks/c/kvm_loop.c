/*
 * kvm_loop: the native lower bound for pyvmm's exit-handling benchmarks.
 *
 *   kvm_loop pio N     N x (KVM_RUN -> KVM_EXIT_IO)    prints ns_per_exit=<float>
 *   kvm_loop mmio N    N x (KVM_RUN -> KVM_EXIT_MMIO)  prints ns_per_exit=<float>
 *   kvm_loop create N  N x (create + tear down a minimal VM)  prints ns_per_vm=<mean> median_ns_per_vm=<median>
 *   kvm_loop coalesced N  the mmio guest with its address in a coalesced zone:
 *                      N writes, each taken from the ring (or from the exit
 *                      when the ring is full)  prints ns_per_write=<float>
 *   kvm_loop coalesced-pio N  the same with the pio guest and a port zone
 *
 * The guest runs in 16-bit real mode: it needs no GDT, page tables or mode
 * switch, so the only state we set is CS:IP, DS and a couple of GPRs.  The
 * guest code must stay byte-identical to benchmarks/raw_kvm_loop.py so the C,
 * raw-Python and pyvmm numbers measure the same guest.
 *
 * Built by the Python benchmark with `cc -O2 -o kvm_loop kvm_loop.c`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE   0x10000u  /* 64 KiB of guest RAM at GPA 0 */
#define CODE_GPA   0x1000u   /* CS = 0, IP = 0x1000 */
#define PIO_PORT   0x10u
/* DS selector 0x1000 -> base 0x10000 = first byte past RAM, so [ds:bx] with
 * bx = 0 is an unbacked GPA and every store to it is an MMIO exit. */
#define MMIO_DS_SEL 0x1000u
#define MMIO_GPA    ((uint64_t)MMIO_DS_SEL << 4)
#define WARMUP     16        /* first entries fault in pages / build shadow state */
/* The real-mode TSS's 3 pages just below the BIOS area, where pyvmm-kvm puts them
 * by default: KVM needs the address on Intel hosts without unrestricted guest
 * (api.rst, KVM_SET_TSS_ADDR), so every x86 VMM sets it and so do all three
 * loops here, making the VM create + destroy figure like for like. */
#define TSS_ADDR   0xfffbd000ul

/* pio:  loop: out dx, al   ; ee
 *             jmp loop     ; eb fd            */
static const uint8_t guest_pio[] = {0xee, 0xeb, 0xfd};
/* mmio: loop: mov [bx], al ; 88 07
 *             jmp loop     ; eb fc            */
static const uint8_t guest_mmio[] = {0x88, 0x07, 0xeb, 0xfc};

static void die(const char *what)
{
	fprintf(stderr, "kvm_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void die_msg(const char *msg)
{
	fprintf(stderr, "kvm_loop: %s\n", msg);
	exit(1);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *what)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		die(what);
	return r;
}

static double now_ns(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
		die("clock_gettime");
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

struct vm {
	int vm_fd;
	int vcpu_fd;
	uint8_t *ram;
	struct kvm_run *run;
	size_t run_size;
};

/* Everything a minimal VM needs: one RAM slot, one vCPU with its run page. */
static void vm_create(int kvm_fd, size_t run_size, struct vm *vm)
{
	vm->run_size = run_size;
	vm->vm_fd = xioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm->vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR");

	vm->ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->ram == MAP_FAILED)
		die("mmap guest RAM");

	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.flags = 0,
		.guest_phys_addr = 0,
		.memory_size = RAM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)vm->ram,
	};
	xioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, (unsigned long)&region, "KVM_SET_USER_MEMORY_REGION");

	vm->vcpu_fd = xioctl(vm->vm_fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
	if (vm->run == MAP_FAILED)
		die("mmap kvm_run");
}

static void vm_destroy(struct vm *vm)
{
	if (munmap(vm->run, vm->run_size) < 0)
		die("munmap kvm_run");
	if (close(vm->vcpu_fd) < 0)
		die("close vcpu");
	if (close(vm->vm_fd) < 0)
		die("close vm");
	if (munmap(vm->ram, RAM_SIZE) < 0)
		die("munmap guest RAM");
}

static void setup_real_mode(struct vm *vm, const uint8_t *code, size_t code_len)
{
	memcpy(vm->ram + CODE_GPA, code, code_len);

	struct kvm_sregs sregs;
	xioctl(vm->vcpu_fd, KVM_GET_SREGS, (unsigned long)&sregs, "KVM_GET_SREGS");
	/* Reset state is CS=f000 base ffff0000; flatten CS so IP is a GPA. */
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds.base = MMIO_GPA;
	sregs.ds.selector = MMIO_DS_SEL;
	xioctl(vm->vcpu_fd, KVM_SET_SREGS, (unsigned long)&sregs, "KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2; /* bit 1 is reserved-as-one; IF clear so no interrupts */
	regs.rax = 0x5a;
	regs.rbx = 0;
	regs.rdx = PIO_PORT;
	xioctl(vm->vcpu_fd, KVM_SET_REGS, (unsigned long)&regs, "KVM_SET_REGS");
}

static void bad_exit(const struct kvm_run *run, const char *expected)
{
	fprintf(stderr, "kvm_loop: expected %s exit, got exit_reason=%u", expected, run->exit_reason);
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		fprintf(stderr, " (internal suberror=%u)", run->internal.suberror);
	else if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
		fprintf(stderr, " (hardware_entry_failure_reason=0x%llx)",
			(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	else if (run->exit_reason == KVM_EXIT_IO)
		fprintf(stderr, " (port=0x%x dir=%u)", run->io.port, run->io.direction);
	else if (run->exit_reason == KVM_EXIT_MMIO)
		fprintf(stderr, " (gpa=0x%llx write=%u)", (unsigned long long)run->mmio.phys_addr, run->mmio.is_write);
	fputc('\n', stderr);
	exit(1);
}

/* Checked inline rather than via a callback so the loop body is as cheap as
 * a real VMM's fast path would be. */
static void run_once_pio(struct vm *vm)
{
	xioctl(vm->vcpu_fd, KVM_RUN, 0, "KVM_RUN");
	const struct kvm_run *run = vm->run;
	if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT || run->io.port != PIO_PORT ||
	    run->io.size != 1)
		bad_exit(run, "PIO out to port 0x10");
}

static void run_once_mmio(struct vm *vm)
{
	xioctl(vm->vcpu_fd, KVM_RUN, 0, "KVM_RUN");
	const struct kvm_run *run = vm->run;
	if (run->exit_reason != KVM_EXIT_MMIO || !run->mmio.is_write || run->mmio.phys_addr != MMIO_GPA ||
	    run->mmio.len != 1)
		bad_exit(run, "MMIO write to 0x10000");
}

static double bench_exits(int kvm_fd, size_t run_size, long n, int mmio)
{
	struct vm vm;
	vm_create(kvm_fd, run_size, &vm);
	if (mmio)
		setup_real_mode(&vm, guest_mmio, sizeof(guest_mmio));
	else
		setup_real_mode(&vm, guest_pio, sizeof(guest_pio));

	void (*once)(struct vm *) = mmio ? run_once_mmio : run_once_pio;
	for (int i = 0; i < WARMUP; i++)
		once(&vm);

	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		once(&vm);
	double t1 = now_ns();

	vm_destroy(&vm);
	return (t1 - t0) / (double)n;
}

/* The floor of a coalesced write: the guest exits to the kernel on every store
 * (the zone's address has no RAM, or is a port) and the kernel appends it to the
 * ring; user space sees an exit only when the ring is full, then drains it. */
static double bench_coalesced(int kvm_fd, size_t run_size, long n, int pio)
{
	int ring_page = xioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO, "KVM_CHECK_EXTENSION");
	long page_size = sysconf(_SC_PAGESIZE);
	if (ring_page <= 0 || (size_t)(ring_page + 1) * (size_t)page_size > run_size)
		die_msg("no coalesced MMIO ring in the vCPU mapping");
	struct vm vm;
	vm_create(kvm_fd, run_size, &vm);
	if (pio)
		setup_real_mode(&vm, guest_pio, sizeof(guest_pio));
	else
		setup_real_mode(&vm, guest_mmio, sizeof(guest_mmio));
	struct kvm_coalesced_mmio_zone zone = {
		.addr = pio ? PIO_PORT : MMIO_GPA,
		.size = pio ? 1 : 8,
		.pio = (uint32_t)pio,
	};
	xioctl(vm.vm_fd, KVM_REGISTER_COALESCED_MMIO, (unsigned long)&zone, "KVM_REGISTER_COALESCED_MMIO");
	struct kvm_coalesced_mmio_ring *ring = (void *)((uint8_t *)vm.run + (size_t)ring_page * (size_t)page_size);
	uint32_t entries = (uint32_t)(((size_t)page_size - sizeof(*ring)) / sizeof(struct kvm_coalesced_mmio));
	volatile uint8_t latch = 0;

	long writes = 0;
	double t0 = 0;
	for (long round = -WARMUP; writes < n; round++) {
		if (round == 0) {
			writes = 0;
			t0 = now_ns();
		}
		/* the ring was full: this write exits */
		if (pio)
			run_once_pio(&vm);
		else
			run_once_mmio(&vm);
		for (uint32_t first = ring->first; first != ring->last; first = (first + 1) % entries) {
			latch = ring->coalesced_mmio[first].data[0];
			writes++;
		}
		__atomic_store_n(&ring->first, ring->last, __ATOMIC_RELEASE);
		latch = pio ? ((uint8_t *)vm.run)[vm.run->io.data_offset] : vm.run->mmio.data[0];
		writes++;
	}
	double t1 = now_ns();
	if (latch != 0x5a)
		die_msg("coalesced writes lost their value");
	vm_destroy(&vm);
	return (t1 - t0) / (double)writes;
}

static int compare_doubles(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Each VM timed on its own: besides the mean, the median VM, which a
 * preemption on a shared machine does not move (it lands in a few VMs). */
static void bench_create(int kvm_fd, size_t run_size, long n, double *mean, double *median)
{
	double *each = malloc((size_t)n * sizeof(*each));
	if (each == NULL)
		die("malloc");
	struct vm vm;
	double total = 0;
	for (long i = 0; i < n; i++) {
		double t0 = now_ns();
		vm_create(kvm_fd, run_size, &vm);
		vm_destroy(&vm);
		each[i] = now_ns() - t0;
		total += each[i];
	}
	qsort(each, (size_t)n, sizeof(*each), compare_doubles);
	*mean = total / (double)n;
	*median = n % 2 ? each[n / 2] : (each[n / 2 - 1] + each[n / 2]) / 2;
	free(each);
}

static void usage(void)
{
	die_msg("usage: kvm_loop {pio|mmio|coalesced|coalesced-pio|create} N");
}

int main(int argc, char **argv)
{
	if (argc != 3)
		usage();
	char *end;
	errno = 0;
	long n = strtol(argv[2], &end, 10);
	if (errno || *end || n <= 0)
		usage();

	int kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	int api = xioctl(kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
	if (api != KVM_API_VERSION) {
		fprintf(stderr, "kvm_loop: KVM API version %d, expected %d\n", api, KVM_API_VERSION);
		return 1;
	}
	int run_size = xioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	if ((size_t)run_size < sizeof(struct kvm_run))
		die_msg("KVM_GET_VCPU_MMAP_SIZE smaller than struct kvm_run");

	if (strcmp(argv[1], "pio") == 0)
		printf("ns_per_exit=%.1f\n", bench_exits(kvm_fd, (size_t)run_size, n, 0));
	else if (strcmp(argv[1], "mmio") == 0)
		printf("ns_per_exit=%.1f\n", bench_exits(kvm_fd, (size_t)run_size, n, 1));
	else if (strcmp(argv[1], "coalesced") == 0)
		printf("ns_per_write=%.1f\n", bench_coalesced(kvm_fd, (size_t)run_size, n, 0));
	else if (strcmp(argv[1], "coalesced-pio") == 0)
		printf("ns_per_write=%.1f\n", bench_coalesced(kvm_fd, (size_t)run_size, n, 1));
	else if (strcmp(argv[1], "create") == 0) {
		double mean, median;
		bench_create(kvm_fd, (size_t)run_size, n, &mean, &median);
		printf("ns_per_vm=%.1f median_ns_per_vm=%.1f\n", mean, median);
	}
	else
		usage();

	if (close(kvm_fd) < 0)
		die("close /dev/kvm");
	return 0;
}
