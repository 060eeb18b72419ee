/* The floor of the boot-time benchmark: only the system calls that applying
 * the configuration needs, with every decision that does not depend on the
 * filesystem's state already taken by the benchmark (bench/bench.py
 * writes the operation list, one operation a line, fields separated by TAB).
 *
 *   S <path> <uid> <gid> <mode>  storage-side directory: mkdir(path, mode);
 *                                if it was created, chown(path, uid, gid)
 *   T <path> <ref>               root-side directory mirroring <ref> (its
 *                                storage counterpart): if mkdir(path) creates
 *                                it, give it ref's owner and mode
 *   D <src> <tgt>                bind-mount directory src onto tgt
 *   F <src> <tgt> <link>         file, method auto: src exists -> create an
 *                                empty tgt and bind-mount src onto it; else
 *                                symlink(link, tgt)
 *   L <tgt> <link>               file, method symlink: symlink(link, tgt)
 *
 * Exit status 0 when every operation succeeded, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures;

static void fail(const char *what, const char *path)
{
    fprintf(stderr, "floor: %s %s: %s\n", what, path, strerror(errno));
    failures++;
}

static char *field(char **cursor)
{
    char *start = *cursor, *end = strchr(start, '\t');
    if (end) {
        *end = '\0';
        *cursor = end + 1;
    } else {
        *cursor = start + strlen(start);
    }
    return start;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: floor OPS-FILE\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(argv[1]);
        return 2;
    }
    char *buf = malloc(st.st_size + 1);
    ssize_t got = 0;
    while (got < st.st_size) {
        ssize_t n = read(fd, buf + got, st.st_size - got);
        if (n <= 0) {
            perror("read");
            return 2;
        }
        got += n;
    }
    buf[got] = '\0';
    close(fd);
    umask(0);

    char *line = buf;
    while (*line) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        char *cur = line + 2;
        switch (line[0]) {
        case 'S': {
            char *path = field(&cur), *uid = field(&cur), *gid = field(&cur), *mode = field(&cur);
            if (mkdir(path, (mode_t)strtoul(mode, NULL, 8)) == 0) {
                if (chown(path, (uid_t)atol(uid), (gid_t)atol(gid)) != 0)
                    fail("chown", path);
            } else if (errno != EEXIST) {
                fail("mkdir", path);
            }
            break;
        }
        case 'T': {
            char *path = field(&cur), *ref = field(&cur);
            struct stat rs;
            if (mkdir(path, 0700) == 0) {
                if (stat(ref, &rs) != 0)
                    fail("stat", ref);
                else if (chown(path, rs.st_uid, rs.st_gid) != 0 || chmod(path, rs.st_mode & 07777) != 0)
                    fail("chown/chmod", path);
            } else if (errno != EEXIST) {
                fail("mkdir", path);
            }
            break;
        }
        case 'D': {
            char *src = field(&cur), *tgt = field(&cur);
            if (mount(src, tgt, NULL, MS_BIND, NULL) != 0)
                fail("mount", tgt);
            break;
        }
        case 'F': {
            char *src = field(&cur), *tgt = field(&cur), *link = field(&cur);
            struct stat ss;
            if (stat(src, &ss) == 0) {
                int t = open(tgt, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (t < 0) {
                    fail("create", tgt);
                    break;
                }
                close(t);
                if (mount(src, tgt, NULL, MS_BIND, NULL) != 0)
                    fail("mount", tgt);
            } else if (symlink(link, tgt) != 0) {
                fail("symlink", tgt);
            }
            break;
        }
        case 'L': {
            char *tgt = field(&cur), *link = field(&cur);
            if (symlink(link, tgt) != 0)
                fail("symlink", tgt);
            break;
        }
        case '\0':
            break;
        default:
            fprintf(stderr, "floor: bad operation %c\n", line[0]);
            return 2;
        }
        if (!nl)
            break;
        line = nl + 1;
    }
    return failures ? 1 : 0;
}
