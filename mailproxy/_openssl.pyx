# cython: language_level=3
"""The OpenSSL bridge: libssl calls on the SSL_CTX of an ssl.SSLContext and the SSL of an SSL socket.

Python's ssl module covers only part of what nginx's ssl_* directives set (session cache modes, ticket
keys, groups lists, SSL_CONF_cmd, a verify callback that lets the handshake finish, ALPN that refuses).
This module reaches the OpenSSL objects behind CPython's own: `_ssl._SSLContext` is PyObject_HEAD then
`SSL_CTX *ctx`, `_ssl._SSLSocket` is PyObject_HEAD, `PyObject *Socket`, then `SSL *ssl` (Modules/_ssl.c,
CPython 3.10 to 3.13). Nothing is used before `problem()` has checked, on live objects, that this holds
and that both modules use one libssl; mailproxy/tls/ then calls the functions below, or refuses the
directives that need them.

The callbacks OpenSSL makes during a handshake (ALPN, ticket keys, verification, the shared session
cache) are plain C below: no Python call, no GIL, per handshake.
"""

from libc.stdint cimport uint64_t
from libc.string cimport memcpy
from cpython.ref cimport PyObject

import os
import sys

import _ssl

cdef extern from *:
    """
    #include <openssl/ssl.h>
    #include <openssl/err.h>
    #include <openssl/evp.h>
    #include <openssl/rand.h>
    #include <openssl/crypto.h>
    #include <openssl/core_names.h>
    #include <openssl/params.h>
    #include <openssl/x509_vfy.h>
    #include <dlfcn.h>
    #include <sched.h>
    #include <signal.h>
    #include <errno.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <time.h>
    #include <unistd.h>

    typedef struct { PyObject_HEAD SSL_CTX *ctx; } mp_context_layout;
    typedef struct { PyObject_HEAD PyObject *Socket; SSL *ssl; } mp_socket_layout;

    static SSL_CTX *mp_ctx_of(PyObject *o) { return ((mp_context_layout *) o)->ctx; }
    static SSL *mp_ssl_of(PyObject *o) { return ((mp_socket_layout *) o)->ssl; }

    static int mp_ssl_keep_index = -1;
    static int mp_ctx_keys_index = -1;
    static int mp_ctx_zone_index = -1;

    /* SSL_free() drops a session that was not shut down from the cache (ssl_clear_bad_session), and
       runs the ex_data free callbacks just before: a marked SSL is shut down there, as nginx's
       ngx_ssl_shutdown() does on every close, whichever path closed it. */
    static void mp_keep_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                             void *argp)
    {
        if (ptr != NULL) {
            SSL_set_shutdown((SSL *) parent, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
        }
    }

    /* ssl_session_ticket_key: nginx's file layouts, the first key encrypts, every key decrypts. */
    typedef struct {
        unsigned char name[16];
        unsigned char aes_key[32];
        unsigned char hmac_key[32];
        int size;
    } mp_ticket_key;

    typedef struct {
        int count;
        mp_ticket_key keys[1];
    } mp_ticket_keys;

    static void mp_keys_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                             void *argp)
    {
        if (ptr != NULL) {
            mp_ticket_keys *keys = ptr;
            OPENSSL_clear_free(ptr, sizeof(mp_ticket_keys) + (keys->count - 1) * sizeof(mp_ticket_key));
        }
    }

    static void mp_keys_install(SSL_CTX *ctx, mp_ticket_keys *keys)
    {
        void *old = SSL_CTX_get_ex_data(ctx, mp_ctx_keys_index);
        SSL_CTX_set_ex_data(ctx, mp_ctx_keys_index, keys);
        mp_keys_free(ctx, old, NULL, mp_ctx_keys_index, 0, NULL);
    }

    static void mp_zone_lock(void *zone);
    static void mp_zone_unlock(void *zone);
    static void *mp_zone_of(SSL_CTX *ctx);
    static int mp_rotate_ticket_keys(SSL_CTX *ctx, mp_ticket_key *current, mp_ticket_key *previous);

    static int mp_ticket_key_cb(SSL *s, unsigned char *name, unsigned char *iv,
                                EVP_CIPHER_CTX *ectx, EVP_MAC_CTX *hctx, int enc)
    {
        SSL_CTX *ctx = SSL_get_SSL_CTX(s);
        mp_ticket_keys *configured = SSL_CTX_get_ex_data(ctx, mp_ctx_keys_index);
        mp_ticket_key shared[2], *keys, *key;
        const EVP_CIPHER *cipher;
        OSSL_PARAM params[2];
        int count, i, result = 1;

        if (configured != NULL) {
            keys = configured->keys;
            count = configured->count;
        } else {
            /* No key files: the shared zone's keys, made and rotated there. */
            if (!mp_rotate_ticket_keys(ctx, &shared[0], &shared[1])) {
                return -1;
            }
            keys = shared;
            count = 2;
        }
        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0);
        params[1] = OSSL_PARAM_construct_end();
        if (enc == 1) {
            key = &keys[0];
            cipher = key->size == 48 ? EVP_aes_128_cbc() : EVP_aes_256_cbc();
            if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(cipher)) != 1
                || EVP_EncryptInit_ex(ectx, cipher, NULL, key->aes_key, iv) != 1
                || EVP_MAC_init(hctx, key->hmac_key, key->size == 48 ? 16 : 32, params) != 1) {
                result = -1;
            } else {
                memcpy(name, key->name, 16);
            }
        } else {
            for (i = 0; i < count; i++) {
                if (memcmp(name, keys[i].name, 16) == 0) {
                    break;
                }
            }
            if (i == count) {
                result = 0;  /* unknown key: a full handshake */
            } else {
                key = &keys[i];
                cipher = key->size == 48 ? EVP_aes_128_cbc() : EVP_aes_256_cbc();
                if (EVP_MAC_init(hctx, key->hmac_key, key->size == 48 ? 16 : 32, params) != 1
                    || EVP_DecryptInit_ex(ectx, cipher, NULL, key->aes_key, iv) != 1) {
                    result = -1;
                } else if (SSL_version(s) == TLS1_3_VERSION || i != 0) {
                    /* A new ticket for TLS 1.3 (single use), and under the current key for a ticket
                       made with an older one, as nginx does. */
                    result = 2;
                }
            }
        }
        OPENSSL_cleanse(shared, sizeof(shared));
        return result;
    }

    /* ALPN: nginx's ngx_mail_ssl_alpn_select(); a client whose list lacks the protocol is refused with
       the fatal no_application_protocol alert. arg is the length-prefixed name. */
    static int mp_alpn_select(SSL *s, const unsigned char **out, unsigned char *outlen,
                              const unsigned char *in, unsigned int inlen, void *arg)
    {
        const unsigned char *srv = arg;
        if (SSL_select_next_proto((unsigned char **) out, outlen, srv, srv[0] + 1, in, inlen)
            != OPENSSL_NPN_NEGOTIATED) {
            return SSL_TLSEXT_ERR_ALERT_FATAL;
        }
        return SSL_TLSEXT_ERR_OK;
    }

    static const unsigned char mp_alpn_imap[] = "\\x04imap";
    static const unsigned char mp_alpn_pop3[] = "\\x04pop3";
    static const unsigned char mp_alpn_smtp[] = "\\x04smtp";
    static const unsigned char mp_alpn_sieve[] = "\\x0bmanagesieve";

    static int mp_alpn_set(SSL_CTX *ctx, const char *protocol)
    {
        const unsigned char *name;
        if (strcmp(protocol, "imap") == 0) name = mp_alpn_imap;
        else if (strcmp(protocol, "pop3") == 0) name = mp_alpn_pop3;
        else if (strcmp(protocol, "smtp") == 0) name = mp_alpn_smtp;
        else if (strcmp(protocol, "sieve") == 0) name = mp_alpn_sieve;
        else return 0;
        SSL_CTX_set_alpn_select_cb(ctx, mp_alpn_select, (void *) name);
        return 1;
    }

    /* nginx's ngx_ssl_verify_callback(): the handshake always completes; the result is read after it
       (SSL_get_verify_result) and the session refused in the protocol's words. */
    static int mp_verify_accept(int ok, X509_STORE_CTX *store)
    {
        return 1;
    }

    /* ssl_session_cache shared:name:size, mapped before the workers are forked, so every worker of a
       master (and of its reloads, which keep the zone) sees it. Sessions are stored at their own length,
       as nginx's slab stores them (a server-side session is 100-250 bytes of DER; one with a client
       certificate, a kilobyte or two): an index of fixed entries found by hashing the session id, and
       a ring that the DER is appended to. An entry whose bytes the ring has since written over is
       stale and reused like an expired one; when the index is full where an id hashes to, the session
       closest to expiry goes. The index takes 44% of the zone and has room for twice the sessions the
       ring holds, so the ring decides: one MB holds about 3,900 sessions of 150 bytes, nginx's about
       4,000. */
    #define MP_ZONE_HEADER 512
    #define MP_BYTES_PER_ENTRY 128  /* an index entry for every 128 bytes: half full at most, few probes */
    #define MP_MAX_SESSION 4096  /* nginx's NGX_SSL_MAX_SESSION_SIZE: larger sessions are not kept */
    #define MP_PROBES 8
    #define MP_MIN_ZONE (8 * 4096)

    /* Ticket keys kept in the zone when no ssl_session_ticket_key is given (nginx 1.23.2's): the
       current key encrypts, the previous one still decrypts, the next one is ready. */
    typedef struct {
        mp_ticket_key key;
        long long expire;  /* 0: not made yet */
    } mp_zone_key;

    typedef struct {
        volatile int lock;  /* the holder's pid, 0 when free */
        unsigned int entries;
        unsigned long long ring_size;
        unsigned long long written;  /* bytes ever appended to the ring */
        mp_zone_key ticket_keys[3];  /* current, previous, next */
    } mp_zone;

    typedef struct {
        unsigned int id_len;  /* 0: free */
        unsigned int der_len;
        long long expires;
        unsigned long long pos;  /* where the DER starts, counted as `written` counts */
        unsigned char id[SSL_MAX_SSL_SESSION_ID_LENGTH];
    } mp_entry;

    typedef char mp_zone_header_fits[sizeof(mp_zone) <= MP_ZONE_HEADER ? 1 : -1];

    static mp_entry *mp_entries(mp_zone *zone)
    {
        return (mp_entry *) ((char *) zone + MP_ZONE_HEADER);
    }

    static unsigned char *mp_ring(mp_zone *zone)
    {
        return (unsigned char *) (mp_entries(zone) + zone->entries);
    }

    /* The entry's bytes are all still in the ring: nothing appended since has reached them. */
    static int mp_intact(mp_zone *zone, mp_entry *entry)
    {
        return zone->written - entry->pos <= zone->ring_size;
    }

    static void mp_ring_copy(mp_zone *zone, unsigned long long pos, unsigned char *to, const unsigned char *from,
                             unsigned int len)
    {
        unsigned char *ring = mp_ring(zone);
        unsigned long long at = pos % zone->ring_size, first = zone->ring_size - at;
        if (first > len) {
            first = len;
        }
        if (to == NULL) {  /* into the ring */
            memcpy(ring + at, from, first);
            memcpy(ring, from + first, len - first);
        } else {  /* out of it */
            memcpy(to, ring + at, first);
            memcpy(to + first, ring, len - first);
        }
    }

    static void mp_zone_lock(void *shared)
    {
        mp_zone *zone = shared;
        int me = (int) getpid();
        unsigned int spins = 0;
        for (;;) {
            int holder = 0;
            if (__atomic_compare_exchange_n(&zone->lock, &holder, me, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED)) {
                return;
            }
            /* A worker killed while holding the lock never releases it: take it over. */
            if (++spins % 1024 == 0 && holder != 0 && kill(holder, 0) == -1 && errno == ESRCH) {
                __atomic_compare_exchange_n(&zone->lock, &holder, 0, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED);
            }
            sched_yield();
        }
    }

    static void mp_zone_unlock(void *shared)
    {
        mp_zone *zone = shared;
        __atomic_store_n(&zone->lock, 0, __ATOMIC_RELEASE);
    }

    static unsigned int mp_hash(const unsigned char *id, unsigned int len)
    {
        unsigned int h = 2166136261u, i;
        for (i = 0; i < len; i++) {
            h = (h ^ id[i]) * 16777619u;
        }
        return h;
    }

    static mp_entry *mp_find(mp_zone *zone, const unsigned char *id, unsigned int len)
    {
        mp_entry *entries = mp_entries(zone);
        unsigned int h = mp_hash(id, len), i;
        for (i = 0; i < MP_PROBES; i++) {
            mp_entry *entry = &entries[(h + i) % zone->entries];
            if (entry->id_len == len && memcmp(entry->id, id, len) == 0) {
                return entry;
            }
        }
        return NULL;
    }

    static void *mp_zone_of(SSL_CTX *ctx)
    {
        return SSL_CTX_get_ex_data(ctx, mp_ctx_zone_index);
    }

    static int mp_random_key(mp_zone_key *slot)
    {
        unsigned char buf[80];
        if (RAND_bytes(buf, 80) != 1) {
            return 0;
        }
        slot->key.size = 80;
        memcpy(slot->key.name, buf, 16);
        memcpy(slot->key.hmac_key, buf + 16, 32);
        memcpy(slot->key.aes_key, buf + 48, 32);
        OPENSSL_cleanse(buf, sizeof(buf));
        return 1;
    }

    /* nginx's ngx_ssl_rotate_ticket_keys(): the current key must outlive every ticket it encrypts
       (its expiry moves to now + ssl_session_timeout at each use); once the previous key can no longer
       be needed, the previous becomes the current, the current the next, and a new next is made. The
       keys live in the zone, so every worker of the master uses the same ones, and a reload keeps them
       with the zone. Copies for this handshake go to ``current`` and ``previous``. */
    static int mp_rotate_ticket_keys(SSL_CTX *ctx, mp_ticket_key *current, mp_ticket_key *previous)
    {
        mp_zone *zone = mp_zone_of(ctx);
        mp_zone_key *keys, first, next;
        long long now = (long long) time(NULL), expire = now + SSL_CTX_get_timeout(ctx);
        int ok = 1;

        if (zone == NULL) {
            return 0;
        }
        mp_zone_lock(zone);
        keys = zone->ticket_keys;
        /* New keys are made aside and put in place only whole: a failed RAND_bytes leaves the zone as
           it was (no keys yet: this ticket fails and the next one tries again; keys: they stay and the
           rotation is tried again at the next ticket). */
        if (keys[0].expire == 0) {
            if (mp_random_key(&first) && mp_random_key(&next)) {
                keys[0] = first;
                keys[0].expire = expire;
                keys[1] = keys[0];  /* no previous key yet: the current one stands in */
                keys[2] = next;
                keys[2].expire = 0;
            } else {
                ok = 0;
            }
        } else if (keys[1].expire < now && mp_random_key(&next)) {
            keys[1] = keys[0];
            keys[0] = keys[2];
            keys[2] = next;
            keys[2].expire = 0;
        }
        if (ok) {
            if (expire > keys[0].expire) {
                keys[0].expire = expire;
            }
            *current = keys[0].key;
            *previous = keys[1].key;
        }
        mp_zone_unlock(zone);
        OPENSSL_cleanse(&first, sizeof(first));
        OPENSSL_cleanse(&next, sizeof(next));
        return ok;
    }

    static int mp_new_session(SSL *s, SSL_SESSION *sess)
    {
        mp_zone *zone = mp_zone_of(SSL_get_SSL_CTX(s));
        unsigned char der[MP_MAX_SESSION], *p = der;
        unsigned int len, h, i;
        const unsigned char *id;
        long long now = (long long) time(NULL), oldest = 0;
        mp_entry *entries, *entry, *victim = NULL;
        int der_len;

        if (zone == NULL) {
            return 0;
        }
        der_len = i2d_SSL_SESSION(sess, NULL);
        if (der_len <= 0 || der_len > MP_MAX_SESSION || (unsigned long long) der_len > zone->ring_size / 4) {
            return 0;  /* too big to keep (a long client certificate chain), as nginx's */
        }
        i2d_SSL_SESSION(sess, &p);
        id = SSL_SESSION_get_id(sess, &len);
        if (len == 0 || len > SSL_MAX_SSL_SESSION_ID_LENGTH) {
            return 0;
        }
        mp_zone_lock(zone);
        entries = mp_entries(zone);
        h = mp_hash(id, len);
        for (i = 0; i < MP_PROBES; i++) {
            entry = &entries[(h + i) % zone->entries];
            if (entry->id_len == 0 || entry->expires <= now || !mp_intact(zone, entry)
                || (entry->id_len == len && memcmp(entry->id, id, len) == 0)) {
                victim = entry;
                break;
            }
            if (victim == NULL || entry->expires < oldest) {
                victim = entry;  /* the index is full here: the session closest to expiry goes */
                oldest = entry->expires;
            }
        }
        mp_ring_copy(zone, zone->written, NULL, der, (unsigned int) der_len);
        victim->pos = zone->written;
        zone->written += (unsigned long long) der_len;
        victim->id_len = len;
        memcpy(victim->id, id, len);
        victim->der_len = (unsigned int) der_len;
        victim->expires = (long long) SSL_SESSION_get_time(sess) + SSL_SESSION_get_timeout(sess);
        mp_zone_unlock(zone);
        return 0;
    }

    static SSL_SESSION *mp_get_session(SSL *s, const unsigned char *id, int len, int *copy)
    {
        mp_zone *zone = mp_zone_of(SSL_get_SSL_CTX(s));
        unsigned char der[MP_MAX_SESSION];
        const unsigned char *p = der;
        unsigned int der_len = 0;
        mp_entry *entry;

        *copy = 0;
        if (zone == NULL || len <= 0 || len > SSL_MAX_SSL_SESSION_ID_LENGTH) {
            return NULL;
        }
        mp_zone_lock(zone);
        entry = mp_find(zone, id, (unsigned int) len);
        if (entry != NULL) {
            if (entry->expires > (long long) time(NULL) && mp_intact(zone, entry)) {
                der_len = entry->der_len;
                mp_ring_copy(zone, entry->pos, der, NULL, der_len);
            } else {
                entry->id_len = 0;
            }
        }
        mp_zone_unlock(zone);
        return der_len ? d2i_SSL_SESSION(NULL, &p, der_len) : NULL;
    }

    static void mp_remove_session(SSL_CTX *ctx, SSL_SESSION *sess)
    {
        mp_zone *zone = mp_zone_of(ctx);
        const unsigned char *id;
        unsigned int len;
        mp_entry *entry;

        if (zone == NULL) {
            return;
        }
        id = SSL_SESSION_get_id(sess, &len);
        mp_zone_lock(zone);
        entry = mp_find(zone, id, len);
        if (entry != NULL) {
            entry->id_len = 0;
        }
        mp_zone_unlock(zone);
    }

    /* The smallest zone nginx accepts is 8 pages; an index entry for every MP_BYTES_PER_ENTRY bytes,
       the ring the rest. */
    static mp_zone *mp_zone_map(size_t size)
    {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        mp_zone *zone;
        if (p == MAP_FAILED) {
            return NULL;
        }
        zone = p;
        zone->lock = 0;
        zone->entries = (unsigned int) (size / MP_BYTES_PER_ENTRY);
        zone->ring_size = size - MP_ZONE_HEADER - (unsigned long long) zone->entries * sizeof(mp_entry);
        zone->written = 0;
        return zone;
    }

    static void mp_zone_unmap(mp_zone *zone, size_t size)
    {
        munmap(zone, size);
    }

    static int mp_init(void)
    {
        if (mp_ssl_keep_index < 0) {
            mp_ssl_keep_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, mp_keep_free);
            mp_ctx_keys_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, mp_keys_free);
            mp_ctx_zone_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        }
        return mp_ssl_keep_index >= 0 && mp_ctx_keys_index >= 0 && mp_ctx_zone_index >= 0;
    }

    static const char *mp_library_path(void)
    {
        Dl_info info;
        if (dladdr((void *) SSL_new, &info) && info.dli_fname != NULL) {
            return info.dli_fname;
        }
        return "";
    }
    """
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_SESSION
    ctypedef struct SSL_CONF_CTX
    ctypedef struct X509
    ctypedef struct mp_ticket_key:
        unsigned char name[16]
        unsigned char aes_key[32]
        unsigned char hmac_key[32]
        int size
    ctypedef struct mp_ticket_keys:
        int count
        mp_ticket_key keys[1]
    ctypedef struct mp_zone:
        unsigned int entries
        unsigned long long ring_size

    SSL_CTX *mp_ctx_of(PyObject *o)
    SSL *mp_ssl_of(PyObject *o)
    int mp_init()
    int mp_alpn_set(SSL_CTX *ctx, const char *protocol)
    void mp_keys_install(SSL_CTX *ctx, mp_ticket_keys *keys)
    int mp_verify_accept(int ok, void *store)
    int mp_ticket_key_cb(SSL *s, unsigned char *name, unsigned char *iv, void *ectx, void *hctx, int enc)
    int mp_new_session(SSL *s, SSL_SESSION *sess)
    SSL_SESSION *mp_get_session(SSL *s, const unsigned char *id, int len, int *copy)
    void mp_remove_session(SSL_CTX *ctx, SSL_SESSION *sess)
    mp_zone *mp_zone_map(size_t size)
    void mp_zone_unmap(mp_zone *zone, size_t size)
    const char *mp_library_path()
    int mp_ssl_keep_index
    int mp_ctx_keys_index
    int mp_ctx_zone_index
    int MP_MIN_ZONE

    unsigned long OpenSSL_version_num()
    const char *OpenSSL_version(int t)
    int OPENSSL_VERSION_CONST "OPENSSL_VERSION"

    uint64_t SSL_CTX_get_options(const SSL_CTX *ctx)
    void *SSL_get_app_data(const SSL *ssl)
    SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl)
    int SSL_set_ex_data(SSL *ssl, int idx, void *data)
    int SSL_CTX_set_ex_data(SSL_CTX *ctx, int idx, void *data)
    void *SSL_CTX_get_ex_data(const SSL_CTX *ctx, int idx)
    long SSL_CTX_set_session_cache_mode(SSL_CTX *ctx, long mode)
    long SSL_CTX_sess_set_cache_size(SSL_CTX *ctx, long size)
    long SSL_CTX_set_timeout(SSL_CTX *ctx, long t)
    int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int sid_ctx_len)
    void SSL_CTX_sess_set_new_cb(SSL_CTX *ctx, int (*cb)(SSL *, SSL_SESSION *))
    void SSL_CTX_sess_set_get_cb(SSL_CTX *ctx, SSL_SESSION *(*cb)(SSL *, const unsigned char *, int, int *))
    void SSL_CTX_sess_set_remove_cb(SSL_CTX *ctx, void (*cb)(SSL_CTX *, SSL_SESSION *))
    long SSL_CTX_set_tlsext_ticket_key_evp_cb(
        SSL_CTX *ctx, int (*cb)(SSL *, unsigned char *, unsigned char *, void *, void *, int))
    int SSL_CTX_set1_groups_list(SSL_CTX *ctx, const char *list)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, int (*cb)(int, void *))
    void SSL_CTX_set_verify_depth(SSL_CTX *ctx, int depth)
    void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, void *names)
    void *SSL_load_client_CA_file(const char *file)
    long SSL_get_verify_result(const SSL *ssl)
    const char *X509_verify_cert_error_string(long n)
    SSL_SESSION *SSL_get0_session(const SSL *s)
    int SSL_CTX_remove_session(SSL_CTX *ctx, SSL_SESSION *s)
    int SSL_session_reused(const SSL *s)

    SSL_CONF_CTX *SSL_CONF_CTX_new()
    unsigned int SSL_CONF_CTX_set_flags(SSL_CONF_CTX *cctx, unsigned int flags)
    void SSL_CONF_CTX_set_ssl_ctx(SSL_CONF_CTX *cctx, SSL_CTX *ctx)
    int SSL_CONF_cmd(SSL_CONF_CTX *cctx, const char *cmd, const char *value)
    int SSL_CONF_cmd_value_type(SSL_CONF_CTX *cctx, const char *cmd)
    int SSL_CONF_CTX_finish(SSL_CONF_CTX *cctx)
    void SSL_CONF_CTX_free(SSL_CONF_CTX *cctx)

    unsigned long ERR_get_error_all(const char **file, int *line, const char **func, const char **data, int *flags)
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    void ERR_clear_error()
    void *OPENSSL_zalloc(size_t num)

    enum:
        SSL_SESS_CACHE_OFF
        SSL_SESS_CACHE_SERVER
        SSL_SESS_CACHE_NO_AUTO_CLEAR
        SSL_SESS_CACHE_NO_INTERNAL_STORE
        SSL_SESS_CACHE_NO_INTERNAL
        SSL_VERIFY_PEER
        SSL_CONF_FLAG_FILE
        SSL_CONF_FLAG_SERVER
        SSL_CONF_FLAG_CLIENT
        SSL_CONF_FLAG_CERTIFICATE
        SSL_CONF_FLAG_SHOW_ERRORS
        SSL_CONF_TYPE_FILE
        SSL_CONF_TYPE_DIR
        ERR_TXT_STRING


class BridgeError(Exception):
    """A libssl call failed; the text is nginx's: the call, then OpenSSL's reasons in parentheses."""


def _errors():
    """The OpenSSL error queue as nginx's ngx_ssl_error() words it: ' (SSL: error:...:reason:data)'."""
    cdef unsigned long code
    cdef const char *data
    cdef int flags
    cdef char buf[256]
    parts = []
    while True:
        code = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)
        if code == 0:
            break
        ERR_error_string_n(code, buf, sizeof(buf))
        text = buf.decode("utf-8", "replace")
        if data != NULL and data[0] != 0 and flags & ERR_TXT_STRING:
            text += ":" + data.decode("utf-8", "replace")
        parts.append(text)
    return " (SSL: %s)" % " ".join(parts) if parts else ""


def library():
    """(OpenSSL's version text, the path of the libssl this module is linked with)."""
    return OpenSSL_version(OPENSSL_VERSION_CONST).decode(), mp_library_path().decode()


def problem(python_version=None):
    """Why the bridge must not be used here, or None. ``python_version``: the OPENSSL_VERSION_NUMBER
    CPython's _ssl reports (its own by default)."""
    if python_version is None:
        python_version = _ssl.OPENSSL_VERSION_NUMBER
    linked = OpenSSL_version_num()
    if python_version != linked:
        return ("Python's ssl module runs OpenSSL 0x%08x and mailproxy._openssl 0x%08x"
                % (python_version, linked))
    if not (3, 10) <= sys.version_info[:2] <= (3, 13):
        return "the layout of CPython %d.%d's _ssl objects is not known" % sys.version_info[:2]
    libraries = _mapped_libssl()
    if len(libraries) > 1:
        return "two libssl are loaded (%s)" % ", ".join(sorted(libraries))
    if not mp_init():
        return "OpenSSL has no ex_data index left"
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cdef SSL_CTX *found
    for flip in (0, ssl.OP_NO_TICKET):
        # Two different option sets must both read back: a coincidence cannot pass twice.
        ctx.options ^= flip
        found = mp_ctx_of(<PyObject *> ctx)
        if found == NULL or SSL_CTX_get_options(found) != <uint64_t> int(ctx.options):
            return "ssl.SSLContext does not hold its SSL_CTX where CPython 3.10-3.13 do"
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)._sslobj
    if not isinstance(obj, _ssl._SSLSocket) or mp_ssl_of(<PyObject *> obj) == NULL \
            or SSL_get_app_data(mp_ssl_of(<PyObject *> obj)) != <void *> obj:
        return "ssl.SSLObject does not hold its SSL where CPython 3.10-3.13 do"
    if SSL_get_SSL_CTX(mp_ssl_of(<PyObject *> obj)) != mp_ctx_of(<PyObject *> ctx):
        return "an SSL object does not point at its context's SSL_CTX"
    return None


def _mapped_libssl():
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and os.path.basename(path).startswith("libssl.so"):
                    found.add(os.path.realpath("/" + path))
    except OSError:
        pass
    return found


cdef SSL_CTX *_ctx(object context) except NULL:
    if not isinstance(context, _ssl._SSLContext):
        raise TypeError("an ssl.SSLContext is needed, not %s" % type(context).__name__)
    cdef SSL_CTX *ctx = mp_ctx_of(<PyObject *> context)
    if ctx == NULL or SSL_CTX_get_options(ctx) != <uint64_t> int(context.options):
        raise BridgeError("the SSL_CTX of this ssl.SSLContext is not where it was checked to be")
    return ctx


cdef SSL *_ssl_of(object sock) except NULL:
    obj = sock if isinstance(sock, _ssl._SSLSocket) else getattr(sock, "_sslobj", None)
    if not isinstance(obj, _ssl._SSLSocket):
        raise TypeError("an SSL socket or object is needed, not %s" % type(sock).__name__)
    cdef SSL *ssl = mp_ssl_of(<PyObject *> obj)
    if ssl == NULL or SSL_get_app_data(ssl) != <void *> obj:
        raise BridgeError("the SSL of this socket is not where it was checked to be")
    return ssl


def session_cache(context, mode, sessions=0, zone=None, double timeout=300):
    """nginx's ngx_ssl_session_cache(): ``mode`` "off", "none" or "cache" (builtin when ``sessions``
    is not None: 0 for OpenSSL's default size; shared when ``zone`` is a SharedZone)."""
    cdef SSL_CTX *ctx = _ctx(context)
    SSL_CTX_set_timeout(ctx, <long> timeout)
    if mode == "off":
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF)
        return
    if mode == "none":
        # nginx: the server claims to cache (Outlook Express needs it) but stores nothing.
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_AUTO_CLEAR
                                       | SSL_SESS_CACHE_NO_INTERNAL_STORE)
        SSL_CTX_sess_set_cache_size(ctx, 1)
        return
    cdef long cache_mode = SSL_SESS_CACHE_SERVER
    if zone is not None and sessions is None:
        cache_mode |= SSL_SESS_CACHE_NO_INTERNAL
    SSL_CTX_set_session_cache_mode(ctx, cache_mode)
    if sessions:
        SSL_CTX_sess_set_cache_size(ctx, sessions)
    if zone is not None:
        SSL_CTX_set_ex_data(ctx, mp_ctx_zone_index, (<SharedZone> zone).zone)
        SSL_CTX_sess_set_new_cb(ctx, mp_new_session)
        SSL_CTX_sess_set_get_cb(ctx, mp_get_session)
        SSL_CTX_sess_set_remove_cb(ctx, mp_remove_session)


cdef class SharedZone:
    """Memory shared by the workers forked after it is made; its sessions outlive the contexts."""

    cdef mp_zone *zone
    cdef readonly size_t size

    def __cinit__(self, size_t size):
        if size < MP_MIN_ZONE:
            raise ValueError("a shared session cache needs %d bytes at least" % MP_MIN_ZONE)
        self.zone = mp_zone_map(size)
        if self.zone == NULL:
            raise OSError("mmap(%d) failed" % size)
        self.size = size

    def __dealloc__(self):
        # Only the contexts that point into it hold it (tls/client.py keeps it on them): none is left.
        if self.zone != NULL:
            mp_zone_unmap(self.zone, self.size)

    @property
    def sessions(self):
        """How many sessions its index holds at most (the ring may fill first with large sessions)."""
        return self.zone.entries


def session_id_context(context, bytes value):
    cdef SSL_CTX *ctx = _ctx(context)
    if SSL_CTX_set_session_id_context(ctx, value, len(value)) != 1:
        raise BridgeError("SSL_CTX_set_session_id_context() failed" + _errors())


def shared_ticket_keys(context):
    """Tickets under keys kept in the context's shared session cache, as nginx does without
    ssl_session_ticket_key: made once, rotated there, the same in every worker and after a reload."""
    cdef SSL_CTX *ctx = _ctx(context)
    if SSL_CTX_get_ex_data(ctx, mp_ctx_zone_index) == NULL:
        raise ValueError("no shared session cache on this context")
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, mp_ticket_key_cb)


def ticket_keys(context, keys):
    """ssl_session_ticket_key: ``keys`` the files' bytes (48 or 80 each), the first encrypting."""
    cdef SSL_CTX *ctx = _ctx(context)
    cdef mp_ticket_keys *table
    cdef mp_ticket_key *key
    cdef bytes blob
    keys = list(keys)
    if not keys:
        return
    for blob in keys:
        if len(blob) not in (48, 80):
            raise ValueError("a ticket key is 48 or 80 bytes")
    table = <mp_ticket_keys *> OPENSSL_zalloc(sizeof(mp_ticket_keys) + (len(keys) - 1) * sizeof(mp_ticket_key))
    if table == NULL:
        raise MemoryError()
    table.count = len(keys)
    for i, blob in enumerate(keys):
        key = &table.keys[i]
        key.size = len(blob)
        memcpy(key.name, <const char *> blob, 16)
        if key.size == 48:
            memcpy(key.aes_key, (<const char *> blob) + 16, 16)
            memcpy(key.hmac_key, (<const char *> blob) + 32, 16)
        else:
            memcpy(key.hmac_key, (<const char *> blob) + 16, 32)
            memcpy(key.aes_key, (<const char *> blob) + 48, 32)
    mp_keys_install(ctx, table)  # OpenSSL's ex_data frees the last one with the context
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, mp_ticket_key_cb)


def groups(context, str names):
    cdef SSL_CTX *ctx = _ctx(context)
    ERR_clear_error()
    if SSL_CTX_set1_groups_list(ctx, names.encode()) != 1:
        raise BridgeError('SSL_CTX_set1_curves_list("%s") failed%s' % (names, _errors()))


def conf_commands(context, commands):
    """ssl_conf_command: SSL_CONF_cmd() for each (name, value, directory), in order, as nginx's
    ngx_ssl_conf_commands(): a file or directory value resolves against ``directory``."""
    cdef SSL_CTX *ctx = _ctx(context)
    cdef SSL_CONF_CTX *cctx = SSL_CONF_CTX_new()
    cdef int kind
    if cctx == NULL:
        raise MemoryError()
    try:
        SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_FILE)
        SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_SERVER)
        SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_CLIENT)
        SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_CERTIFICATE)
        SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_SHOW_ERRORS)
        SSL_CONF_CTX_set_ssl_ctx(cctx, ctx)
        ERR_clear_error()
        for name, value, directory in commands:
            kind = SSL_CONF_cmd_value_type(cctx, name.encode())
            if kind in (SSL_CONF_TYPE_FILE, SSL_CONF_TYPE_DIR) and directory:
                value = os.path.join(directory, value)
            if SSL_CONF_cmd(cctx, name.encode(), os.fsencode(value)) <= 0:
                raise BridgeError('SSL_CONF_cmd("%s", "%s") failed%s' % (name, value, _errors()))
        if SSL_CONF_CTX_finish(cctx) != 1:
            raise BridgeError("SSL_CONF_finish() failed" + _errors())
    finally:
        SSL_CONF_CTX_free(cctx)


def alpn(context, str protocol):
    """Select ``protocol``'s ALPN name (imap, pop3, smtp; managesieve for sieve) or refuse the client."""
    cdef SSL_CTX *ctx = _ctx(context)
    if not mp_alpn_set(ctx, protocol.encode()):
        raise ValueError("no ALPN name for %s" % protocol)


def verify_client(context, int depth, str client_ca=None):
    """ssl_verify_client on|optional|optional_no_ca: ask for a certificate, let the handshake finish
    whatever the verification says (verify_result() tells afterwards), and name the CAs of
    ``client_ca`` to the client."""
    cdef SSL_CTX *ctx = _ctx(context)
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, mp_verify_accept)
    SSL_CTX_set_verify_depth(ctx, depth)
    if client_ca is not None:
        ERR_clear_error()
        names = SSL_load_client_CA_file(os.fsencode(client_ca))
        if names == NULL:
            raise BridgeError('SSL_load_client_CA_file("%s") failed%s' % (client_ca, _errors()))
        SSL_CTX_set_client_CA_list(ctx, names)


def verify_result(sock):
    """(code, OpenSSL's text) of the client certificate's verification; (0, "ok") when it passed."""
    cdef long code = SSL_get_verify_result(_ssl_of(sock))
    return code, X509_verify_cert_error_string(code).decode()


def keep_session(sock):
    """Shut the session down when its SSL is freed, so that no close path drops it from the cache."""
    SSL_set_ex_data(_ssl_of(sock), mp_ssl_keep_index, <void *> 1)


def remove_session(sock):
    """Take this connection's session out of the cache (nginx does, on a refused certificate), and
    leave it out when the SSL is freed."""
    cdef SSL *ssl = _ssl_of(sock)
    SSL_set_ex_data(ssl, mp_ssl_keep_index, NULL)
    cdef SSL_SESSION *session = SSL_get0_session(ssl)
    if session != NULL:
        SSL_CTX_remove_session(SSL_get_SSL_CTX(ssl), session)


def session_reused(sock):
    return bool(SSL_session_reused(_ssl_of(sock)))


def read_ahead(context):
    """One read(2) for as many records as have arrived, not two (header, body) per record, on every
    connection of this context, as nginx's contexts (SSL_CTX_set_read_ahead). Bytes read ahead wait
    inside the SSL, undecrypted: has_pending() tells, SSL_pending() does not."""
    SSL_CTX_set_read_ahead(_ctx(context), 1)


def has_pending(sock):
    """Bytes inside this SSL that no socket event will announce: decrypted, or read ahead."""
    return SSL_has_pending(_ssl_of(sock)) != 0


# -- the TLS relay pump ------------------------------------------------------------------------------
#
# One direction of a relayed session with TLS on at least one side: SSL_read (or recv on a plain
# side) into a buffer, SSL_write (or send) out of it, until something would block, the source ends or
# the budget is spent, with the GIL released and no Python call per record. Like mailproxy._splice it
# holds no policy: mailproxy/relay.py owns the watchers, the timer and how a session ends, and words
# errors with events.failed_call() from the exceptions raised here.
#
# kTLS seam: where the kernel offers the TLS ULP and OpenSSL enabled it on a connection
# (BIO_get_ktls_send/BIO_get_ktls_recv on SSL_get_wbio/SSL_get_rbio, SSL_OP_ENABLE_KTLS set on the
# context before the handshake), a direction whose both ends are kernel-encrypted or plain could move
# bytes with mailproxy._splice.pump instead of this loop, once what OpenSSL already holds
# (SSL_has_pending) is delivered; read-ahead (set below) must stay off on such a connection, as
# OpenSSL's kTLS receive path requires. relay.py picks the pump per direction in _Direction.__init__;
# that choice is where a kTLS direction would go. Not done: no kernel here offers the ULP, so nothing
# of it could be tested.

from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR, EAGAIN

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    int c_setsockopt "setsockopt"(int fd, int level, int name, const void *value, unsigned int size)
    enum:
        MSG_NOSIGNAL

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_CORK

cdef extern from "<openssl/ssl.h>" nogil:
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_has_pending(const SSL *ssl)
    void SSL_set_read_ahead(SSL *ssl, int yes)
    void SSL_CTX_set_read_ahead(SSL_CTX *ctx, int yes)
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        SSL_R_UNEXPECTED_EOF_WHILE_READING
        ERR_LIB_SSL
        SSL3_RT_MAX_PLAIN_LENGTH

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_peek_last_error()
    int ERR_GET_LIB(unsigned long e)
    int ERR_GET_REASON(unsigned long e)
    const char *ERR_reason_error_string(unsigned long e)
    void ERR_clear_error_nogil "ERR_clear_error"()

# What stopped a run; the source is drained into the destination before every read, so only
# AGAIN_DST and AGAIN_DST_READ leave bytes held.
cdef enum:
    _P_AGAIN_SRC = 0         # the source has nothing to read now
    _P_AGAIN_SRC_WRITE = 1   # the source's SSL must write before it can read (a renegotiation)
    _P_AGAIN_DST = 2         # the destination cannot take more now
    _P_AGAIN_DST_READ = 3    # the destination's SSL must read before it can write
    _P_EOF = 4               # the source ended (close_notify, TCP FIN, or EOF without close_notify)
    _P_BUDGET = 5            # max_bytes delivered; the source may have more
    _P_BUDGET_PENDING = 6    # max_bytes delivered; the source's SSL holds bytes read already
    _P_ERR_SRC = 10
    _P_ERR_DST = 11

PUMP_AGAIN_SRC = _P_AGAIN_SRC
PUMP_AGAIN_SRC_WRITE = _P_AGAIN_SRC_WRITE
PUMP_AGAIN_DST = _P_AGAIN_DST
PUMP_AGAIN_DST_READ = _P_AGAIN_DST_READ
PUMP_EOF = _P_EOF
PUMP_BUDGET = _P_BUDGET
PUMP_BUDGET_PENDING = _P_BUDGET_PENDING


class PumpSyscallError(OSError):
    """recv/send (or OpenSSL's socket BIO under SSL_read/SSL_write) failed with this errno.
    ``side`` is "src" or "dst"; ``moved`` the bytes delivered by the run before the error."""


cdef object _ssl_error_type = None


def _pump_ssl_error(side, moved, str reason):
    # An ssl.SSLError so that netio.failed_call() words it as it words the copy path's: args[1] is
    # OpenSSL's reason text alone, as ssl_error_text() extracts it from Python's own exceptions.
    global _ssl_error_type
    if _ssl_error_type is None:
        import ssl

        class PumpSSLError(ssl.SSLError):
            """SSL_read/SSL_write failed with SSL_ERROR_SSL; ``side``, ``moved`` as PumpSyscallError."""

        _ssl_error_type = PumpSSLError
    exc = _ssl_error_type(1, reason)
    exc.side = side
    exc.moved = moved
    return exc


cdef struct _pump_err:
    int sys_errno             # the errno of a system call failure; 0 for an OpenSSL one
    unsigned long ssl_code    # OpenSSL's last error for SSL_ERROR_SSL (0: the queue was empty)
    int eof_violation         # SSL_write hit EOF under TLS: Python words it as an SSLEOFError


cdef int _read_src(SSL *ssl, int fd, char *buf, int size, int *got, _pump_err *err) noexcept nogil:
    cdef int r, e, saved
    cdef ssize_t n
    cdef unsigned long code
    if ssl == NULL:
        while True:
            n = c_recv(fd, buf, <size_t> size, 0)
            if n > 0:
                got[0] = <int> n
                return -1
            if n == 0:
                return _P_EOF
            saved = errno
            if saved == EINTR:
                continue
            if saved == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                return _P_AGAIN_SRC
            err.sys_errno = saved
            return _P_ERR_SRC
    ERR_clear_error_nogil()
    r = SSL_read(ssl, buf, size)
    if r > 0:
        got[0] = r
        return -1
    e = SSL_get_error(ssl, r)
    if e == SSL_ERROR_WANT_READ:
        return _P_AGAIN_SRC
    if e == SSL_ERROR_WANT_WRITE:
        return _P_AGAIN_SRC_WRITE
    if e == SSL_ERROR_ZERO_RETURN:
        return _P_EOF
    code = ERR_peek_last_error()
    # CPython's mapping (Modules/_ssl.c PySSL_SetError), which the copy path lives by: an EOF without
    # close_notify is an SSLEOFError, read as an end of stream; so is an I/O error under SSL_read (a
    # reset), because CPython's SSL_read_ex returns 0 and PySSL_SetError then keeps no errno.
    if code != 0 and ERR_GET_LIB(code) == ERR_LIB_SSL \
            and ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING:
        ERR_clear_error_nogil()
        return _P_EOF
    if e == SSL_ERROR_SYSCALL and code == 0:
        return _P_EOF
    err.sys_errno = 0
    err.ssl_code = code
    return _P_ERR_SRC


cdef int _write_dst(SSL *ssl, int fd, const char *buf, Py_ssize_t size, Py_ssize_t *put,
                    _pump_err *err) noexcept nogil:
    cdef int r, e, saved
    cdef ssize_t n
    cdef unsigned long code
    if ssl == NULL:
        while True:
            n = c_send(fd, buf, <size_t> size, MSG_NOSIGNAL)
            if n >= 0:
                put[0] = n
                return -1
            saved = errno
            if saved == EINTR:
                continue
            if saved == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                return _P_AGAIN_DST
            err.sys_errno = saved
            return _P_ERR_DST
    # Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython does not set it) SSL_write takes all or, after a
    # WANT_*, must be called again with the same bytes: the held bytes stay untouched until then.
    ERR_clear_error_nogil()
    r = SSL_write(ssl, buf, <int> size)
    if r > 0:
        put[0] = r
        return -1
    e = SSL_get_error(ssl, r)
    if e == SSL_ERROR_WANT_WRITE:
        return _P_AGAIN_DST
    if e == SSL_ERROR_WANT_READ:
        return _P_AGAIN_DST_READ
    code = ERR_peek_last_error()
    if e == SSL_ERROR_SYSCALL and code == 0:
        # CPython (SSL_write_ex, see _read_src) words any I/O error here as an SSLEOFError.
        err.eof_violation = 1
        return _P_ERR_DST
    err.sys_errno = 0
    err.ssl_code = code
    return _P_ERR_DST


cdef class TlsPump:
    """One direction of a relayed session with TLS on either side (or both).

    ``src``/``dst``: an SSL socket or SSLObject (reached through the bridge's checked accessor) or
    None for a plain side, whose descriptor is ``src_fd``/``dst_fd``. ``read_size`` bounds every read
    (client_buffer from the client, proxy_buffer from the backend), raised to a TLS record (16 KiB) when
    it is smaller: TLS on either side is read and written a record at a time. ``pending``: login
    leftovers, sent first. Bytes the destination did not take stay in a buffer of one read at most
    (leftovers: their own size) until run() delivers them; an idle direction holds no buffer. A run
    that writes more than one record to a TLS destination corks its socket until the run ends (see
    _run). Every run happens in the thread that owns the sockets (the hub's): OpenSSL allows one
    caller per SSL at a time.
    """

    cdef object src_owner
    cdef object dst_owner
    cdef SSL *src_ssl
    cdef SSL *dst_ssl
    cdef int src_fd
    cdef int dst_fd
    cdef int read_size
    cdef char *buf
    cdef Py_ssize_t cap
    cdef Py_ssize_t off
    cdef Py_ssize_t nheld
    cdef bint may_cork

    def __cinit__(self, src, int src_fd, dst, int dst_fd, Py_ssize_t read_size, pending=None):
        self.src_ssl = self.dst_ssl = NULL
        self.buf = NULL
        self.cap = self.off = self.nheld = 0
        if src is None and dst is None:
            raise ValueError("a TLS pump needs TLS on one side at least")
        # Holding the _SSLSocket objects keeps their SSL alive as long as this pump can reach it.
        if src is not None:
            self.src_ssl = _ssl_of(src)
            self.src_owner = src if isinstance(src, _ssl._SSLSocket) else src._sslobj
        if dst is not None:
            self.dst_ssl = _ssl_of(dst)
            self.dst_owner = dst if isinstance(dst, _ssl._SSLSocket) else dst._sslobj
        if self.src_ssl != NULL:
            # One read(2) for as many records as have arrived, not two (header, body) per record, as
            # nginx's contexts do (SSL_CTX_set_read_ahead); the budget check below then asks
            # SSL_has_pending, which also counts read-ahead bytes not yet decrypted.
            SSL_set_read_ahead(self.src_ssl, 1)
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.may_cork = self.dst_ssl != NULL
        if read_size < SSL3_RT_MAX_PLAIN_LENGTH:
            # Reads smaller than a TLS record, as nginx's mail proxy makes them (a page, 4 KiB, by
            # default), cost a record's work per slice. A TLS source's record is held decrypted whole
            # by OpenSSL: read out in slices it cost four send(2) calls a record to a plain backend
            # (an upload's CPU per GiB 0.92 -> 0.76, nginx's 0.86). Towards a TLS destination every
            # write is a record of its own: 4 KiB reads made four records, four encryptions and four
            # write(2) where one does (eight streams down: CPU per GiB 1.48 -> 1.16, nginx's 1.52;
            # bench/RESULTS.md). OpenSSL keeps a record-sized buffer per direction of an SSL anyway,
            # so what the pump holds for a stalled destination, one record at most, is the same order.
            read_size = SSL3_RT_MAX_PLAIN_LENGTH
        # SSL_read takes an int; a record is 16 KiB at most, so more than 1 GiB per call gains nothing.
        self.read_size = <int> max(1, min(read_size, 1 << 30))
        cdef const unsigned char[:] view
        if pending:
            view = memoryview(pending).cast("B")
            self._reserve(max(<Py_ssize_t> self.read_size, len(view)))
            memcpy(self.buf, &view[0], len(view))
            self.nheld = len(view)

    cdef int _reserve(self, Py_ssize_t size) except -1:
        if self.buf != NULL and self.cap >= size:
            return 0
        free(self.buf)
        self.buf = <char *> malloc(size)
        self.cap = size if self.buf != NULL else 0
        if self.buf == NULL:
            raise MemoryError()
        return 0

    @property
    def held(self):
        """Bytes read and not yet delivered."""
        return self.nheld

    def run(self, Py_ssize_t max_bytes):
        """Move bytes until something would block, the source ends, or at least ``max_bytes`` were
        delivered; held bytes go out first. Returns (delivered, status), status one of PUMP_*.
        Raises PumpSyscallError or an ssl.SSLError (side, moved) for a failed read or write."""
        cdef Py_ssize_t moved = 0
        cdef _pump_err err
        cdef int status
        cdef int corked = 0
        cdef int no = 0
        if self.src_owner is None and self.dst_owner is None:
            # Released: the pointers no longer say which side is TLS, and the descriptors may be reused.
            raise ValueError("run() on a released TlsPump")
        err.sys_errno = 0
        err.ssl_code = 0
        err.eof_violation = 0
        if self.buf == NULL:
            self._reserve(self.read_size)
        with nogil:
            status = self._run(max_bytes, &moved, &err, &corked)
            if corked:
                # Uncorking sends what the run left in a partial segment: nothing waits past the run.
                c_setsockopt(self.dst_fd, IPPROTO_TCP, TCP_CORK, &no, sizeof(no))
        if self.nheld == 0 and self.buf != NULL:
            # Nothing in flight: an idle session keeps no buffer.
            free(self.buf)
            self.buf = NULL
            self.cap = 0
        if status == _P_ERR_SRC or status == _P_ERR_DST:
            raise self._error("src" if status == _P_ERR_SRC else "dst", moved, &err)
        return moved, status

    cdef int _run(self, Py_ssize_t max_bytes, Py_ssize_t *moved, _pump_err *err, int *corked) noexcept nogil:
        cdef int status, got
        cdef int on = 1
        cdef int writes = 0
        cdef Py_ssize_t put
        while True:
            while self.nheld > 0:
                if writes == 1 and self.may_cork and not corked[0]:
                    # A second record in one run means bulk. The listener's TCP_NODELAY (there for a
                    # reply's sake) would send each record as a segment of its own: 315 segments a
                    # MiB against nginx's 67, whose mail sockets keep Nagle (measured, OutSegs).
                    # Corked until the run ends they leave in full segments (55 a MiB); a run with
                    # one record, a reply, goes out at once as before. SSL_write takes no MSG_MORE;
                    # a Unix socket takes no cork.
                    if c_setsockopt(self.dst_fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)) == 0:
                        corked[0] = 1
                    else:
                        self.may_cork = False
                writes += 1
                status = _write_dst(self.dst_ssl, self.dst_fd, self.buf + self.off, self.nheld, &put, err)
                if status >= 0:
                    return status
                self.off += put
                self.nheld -= put
                moved[0] += put
            self.off = 0
            if moved[0] >= max_bytes:
                # Bytes already inside the SSL are announced by no socket event.
                if self.src_ssl != NULL and SSL_has_pending(self.src_ssl):
                    return _P_BUDGET_PENDING
                return _P_BUDGET
            status = _read_src(self.src_ssl, self.src_fd, self.buf, self.read_size, &got, err)
            if status >= 0:
                return status
            self.nheld = got

    cdef object _error(self, str side, Py_ssize_t moved, _pump_err *err):
        cdef const char *text
        if err.sys_errno:
            exc = PumpSyscallError(err.sys_errno, os.strerror(err.sys_errno))
            exc.side = side
            exc.moved = moved
            return exc
        if err.eof_violation:
            return _pump_ssl_error(side, moved, "EOF occurred in violation of protocol")
        text = ERR_reason_error_string(err.ssl_code) if err.ssl_code else NULL
        ERR_clear_error()
        reason = text.decode("utf-8", "replace") if text != NULL else (
            "A failure in the SSL library occurred" if err.ssl_code == 0 else "unknown error (0x%x)" % err.ssl_code)
        return _pump_ssl_error(side, moved, reason)

    def release(self):
        """Drop whatever is held and the SSL objects (the session is ending)."""
        free(self.buf)
        self.buf = NULL
        self.cap = self.off = self.nheld = 0
        self.src_ssl = self.dst_ssl = NULL
        self.src_owner = self.dst_owner = None

    def __dealloc__(self):
        free(self.buf)
