/* Measures one command for the boot-time benchmark:
 *
 *   runner STDOUT-FILE STDERR-FILE COMMAND [ARG...]
 *
 * prints "<wall ns> <peak RSS KiB> <exit code>" on its own stdout.
 *
 * Why a separate, small C process: Linux's ru_maxrss for a child counts the
 * memory of the process image it replaced at exec — with fork or vfork from
 * the (Python) benchmark that is the benchmark's own 15-20 MiB. Spawned from
 * this program, the floor under every reading is this program's ~1 MiB.
 * The reading is the peak RSS of the largest single process of the tree
 * (wait4 reports the max over the child and the descendants it waited for).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: runner STDOUT STDERR COMMAND [ARG...]\n");
        return 2;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);

    struct timespec t0, t1;
    pid_t pid;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int err = posix_spawn(&pid, argv[3], &fa, NULL, argv + 3, environ);
    if (err) {
        fprintf(stderr, "runner: cannot run %s\n", argv[3]);
        return 2;
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        perror("wait4");
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long long ns = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("%lld %ld %d\n", ns, ru.ru_maxrss, code);
    return 0;
}
