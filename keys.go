package imgcache

import (
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
	"strings"
	"unicode"
	"unicode/utf8"
	"unsafe"

	"github.com/cespare/xxhash/v2"
)

// MaxKeyLen bounds the length of a Redis key, namespace included. Redis accepts far longer keys, but a
// key this long is a bug in the caller (an id that is really a URL with a query string, say), and every
// byte of it is paid for in memory on every instance.
const MaxKeyLen = 1024

// Key identifies one cached value. Build it with [NewKey] and [Key.With]; the zero Key is invalid.
//
// A Key is a small comparable value: equivalent keys (same entity and id, the same parameters after
// normalisation, in any order) are ==, so two code paths cannot spell one entry two ways. A Key that
// was built from bad input stays a Key, but every Cache method given it returns an error that says
// what was wrong; [Key.Err] reports it early.
//
// The Redis key is "<Namespace>:" followed by [Key.String]:
//
//	<entity>:<id>:<16 hex digits of xxhash64 over the normalised parameters>
//
// for example "imgcache:artist:123:4f0c6e2b1a9d8e77". Entity and id are escaped: every byte that is
// ':', '%', a Redis glob character (* ? [ ] \), a hash-tag brace ({ }), a space, '^', or a control
// byte is written as '%' and two upper-case hex digits. So no two different keys share a Redis key
// ("12" and "123", "a:b", an entity "artist:a"), no id can act as a glob in a pattern, and no id can
// pin its key to a Redis Cluster slot.
type Key struct {
	// s is the canonical form and then the Redis form, String's. The canonical form, s[:n], is:
	// entity NUL id NUL name NUL value NUL name NUL value ..., parameters sorted by name. Valid parts
	// contain no control bytes, so NUL cannot occur inside a part and the form is unambiguous. The
	// Redis form is a function of it, built once with the key, so that no read, write or
	// invalidation escapes and hashes a key again. An invalid key has s = NUL followed by the reason
	// and n = len(s); the zero Key has s = "".
	s string
	// h is xxhash64 of "entity NUL id", mixed, xor that of the parameters (see finishKey), used to
	// pick an L1 shard and slot without hashing the key again on every read.
	h uint64
	// n is the length of the canonical form in s.
	n int
}

// NewKey returns the key of an entity ("artist", "album") and one of its ids ("123").
//
// The entity is trimmed and case-folded, so "Artist " and "artist" are one entity. The id is kept
// exactly as given (ids are case-sensitive in many stores, and a trimmed id would hide a caller's bug);
// it must be non-empty and contain no control characters.
func NewKey(entity, id string) Key {
	// Check UTF-8 before normalising: case folding would turn every invalid byte into U+FFFD and make
	// different inputs one key.
	if !utf8.ValidString(entity) || !utf8.ValidString(id) {
		return badKey("entity or id is not valid UTF-8")
	}
	// Control characters are refused as given, before trimming could hide a stray "\n".
	if hasControl(entity) {
		return badKey(fmt.Sprintf("entity %q has a control character", entity))
	}
	e := strings.ToLower(strings.TrimSpace(entity))
	switch {
	case e == "":
		return badKey("empty entity")
	case id == "":
		return badKey(fmt.Sprintf("empty id for entity %q", e))
	case hasControl(id):
		return badKey(fmt.Sprintf("id %q has a control character", id))
	}
	return makeKey(e, id, "")
}

// With returns the key with one more parameter, such as With("size", "256") or With("type",
// "avatar"). Parameters distinguish variants of one entity's image; they are part of the key's hash,
// and [Cache.InvalidateEntity] removes every variant at once.
//
// Names are normalised: case-folded, with '_', '-', '.' and white space dropped, so "userID",
// "user_id" and "User-Id" are one name. Values are trimmed and keep their case. The order in which
// parameters are added does not matter. A repeated name replaces the earlier value (the last With
// wins), as assigning to a map would. A name that normalises to nothing, or a name or value with a
// control character (tabs and newlines included) or invalid UTF-8, makes the key invalid.
func (k Key) With(name, value string) Key {
	if !k.Valid() {
		return k
	}
	switch {
	case !utf8.ValidString(name) || !utf8.ValidString(value):
		return badKey(fmt.Sprintf("parameter %q is not valid UTF-8", name))
	case hasControl(name) || hasControl(value):
		return badKey(fmt.Sprintf("parameter %q has a control character", name))
	}
	n := normName(name)
	v := strings.TrimSpace(value)
	if n == "" {
		return badKey(fmt.Sprintf("parameter name %q is empty after normalisation", name))
	}
	// One pass over the sorted pairs, writing the new one in its place, into the new key's buffer:
	// it differs from k in that pair alone, so k's size and the pair's bound it.
	head, rest := k.split()
	if least := len(head) + 2 + len(n) + len(v); least > MaxKeyLen { // before allocating for it
		return badKey(fmt.Sprintf("key of at least %d bytes is longer than %d", least, MaxKeyLen))
	}
	b := make([]byte, 0, len(k.s)+len(n)+len(v)+2)
	b = append(b, head...)
	pair := func(name, value string) {
		b = append(append(append(append(b, 0), name...), 0), value...)
	}
	done := false
	for rest != "" {
		name, r, _ := strings.Cut(rest, "\x00")
		value, r, _ := strings.Cut(r, "\x00")
		rest = r
		if !done && name >= n {
			pair(n, v)
			done = true
			if name == n {
				continue // the last With wins
			}
		}
		pair(name, value)
	}
	if !done {
		pair(n, v)
	}
	return finishKey(b, len(head), k.escapedHead(), "", "")
}

// Valid reports whether the key was built from good input.
func (k Key) Valid() bool { return k.s != "" && k.s[0] != 0 }

// canonical returns the key's canonical form (see Key.s); for an invalid key, NUL and the reason.
func (k Key) canonical() string { return k.s[:k.n] }

// redis returns a valid key's Redis form, String's, or "" for an invalid key.
func (k Key) redis() string { return k.s[k.n:] }

// escapedHead returns a valid key's "<escaped entity>:<escaped id>", as its entity's Redis keys
// hold it (l2.entityKey), or "" for an invalid key.
func (k Key) escapedHead() string {
	if !k.Valid() {
		return ""
	}
	return k.s[k.n : len(k.s)-len(":0123456789abcdef")]
}

// Err returns nil for a valid key, or an error that says what input made it invalid.
func (k Key) Err() error {
	if k.Valid() {
		return nil
	}
	if k.s == "" {
		return errZeroKey
	}
	return fmt.Errorf("imgcache: invalid key: %s", k.s[1:])
}

// Entity returns the normalised entity, or "" for an invalid key.
func (k Key) Entity() string {
	if !k.Valid() {
		return ""
	}
	e, _, _ := strings.Cut(k.canonical(), "\x00")
	return e
}

// ID returns the id exactly as given to [NewKey], or "" for an invalid key.
func (k Key) ID() string {
	if !k.Valid() {
		return ""
	}
	_, rest, _ := strings.Cut(k.canonical(), "\x00")
	id, _, _ := strings.Cut(rest, "\x00")
	return id
}

// String returns the key as it appears in Redis after "<Namespace>:", as described on [Key]. A
// valid key carries this form from [NewKey] and [Key.With] on, so String does not allocate. An
// invalid key returns "!invalid(<reason>)", which contains characters no valid key has.
func (k Key) String() string {
	if !k.Valid() {
		if k.s == "" {
			return "!invalid(zero Key)"
		}
		return "!invalid(" + k.s[1:] + ")"
	}
	return k.redis()
}

// noParamsHash is the xxhash of no parameters: most keys have none.
var noParamsHash = xxhash.Sum64String("")

// appendSum appends h as 16 hex digits, big-endian.
func appendSum(b []byte, h uint64) []byte {
	var sum [8]byte
	for i := 7; i >= 0; i-- {
		sum[i] = byte(h)
		h >>= 8
	}
	return hex.AppendEncode(b, sum[:])
}

// GoString makes %#v print the key readably in test failures.
func (k Key) GoString() string { return "imgcache.Key(" + k.String() + ")" }

// entityPrefix returns "<escaped entity>:<escaped id>:", the part of the Redis key (after the
// namespace) that every variant of one entity's id shares.
func entityPrefix(entity, id string) string { return escapedHead(entity, id) + ":" }

// escapedHead returns "<escaped entity>:<escaped id>", what Key.escapedHead holds for a key of
// this entity and id.
func escapedHead(entity, id string) string {
	return string(appendEscaped(append(appendEscaped(nil, entity), ':'), id))
}

var errZeroKey = errors.New("imgcache: invalid key: zero Key (use NewKey)")

func badKey(reason string) Key {
	s := "\x00" + reason
	return Key{s: s, n: len(s)}
}

// makeKey returns the key with these normalised parts (params canonical: "name NUL value NUL ...",
// sorted by name, or ""), in one allocation, or an invalid key if its canonical form is longer than
// MaxKeyLen.
func makeKey(e, id, params string) Key {
	n := len(e) + 1 + len(id)
	if params != "" {
		n += 1 + len(params)
	}
	if n > MaxKeyLen {
		return badKey(fmt.Sprintf("key of %d bytes is longer than %d", n, MaxKeyLen))
	}
	// The Redis form is about as long as the canonical form; append grows b if there are escapes.
	b := make([]byte, 0, 2*n+len(":0123456789abcdef"))
	b = append(append(append(b, e...), 0), id...)
	if params != "" {
		b = append(append(b, 0), params...)
	}
	return finishKey(b, len(e)+1+len(id), "", e, id)
}

// finishKey appends the Redis form to b, which holds a key's canonical form, the first head bytes
// of it "entity NUL id", and returns the key, or an invalid key if the canonical form is longer
// than MaxKeyLen. escHead is "<escaped entity>:<escaped id>" if the caller has it (another key's
// escapedHead); if it is "", e and id are escaped.
func finishKey(b []byte, head int, escHead, e, id string) Key {
	n := len(b)
	if n > MaxKeyLen {
		return badKey(fmt.Sprintf("key of %d bytes is longer than %d", n, MaxKeyLen))
	}
	sum := noParamsHash
	if n > head {
		sum = xxhash.Sum64(b[head+1:])
	}
	if escHead != "" {
		b = append(b, escHead...)
	} else {
		b = appendEscaped(append(appendEscaped(b, e), ':'), id)
	}
	b = appendSum(append(b, ':'), sum)
	s := unsafe.String(unsafe.SliceData(b), len(b)) // b is not written again
	// The parameters' hash is in the Redis form already: h needs only the head's, mixed first. A
	// plain xor would make a key whose head and parameters are the same string hash to 0, and two
	// keys that swap them hash alike; L1 keeps one entry per hash, so they would evict each other.
	return Key{s: s, h: bits.RotateLeft64(xxhash.Sum64String(s[:head])*0x9e3779b97f4a7c15, 31) ^ sum, n: n}
}

// split returns "entity NUL id" and the parameter part "name NUL value NUL ..." (without its leading
// NUL), which is what the parameter hash covers.
func (k Key) split() (head, params string) {
	c := k.canonical()
	i := strings.IndexByte(c, 0)
	j := strings.IndexByte(c[i+1:], 0)
	if j < 0 {
		return c, ""
	}
	return c[:i+1+j], c[i+2+j:]
}

// normName case-folds a parameter name and drops the separators people spell differently.
func normName(name string) string {
	return strings.Map(func(r rune) rune {
		if r == '_' || r == '-' || r == '.' || unicode.IsSpace(r) {
			return -1
		}
		return unicode.ToLower(r)
	}, name)
}

func hasControl(s string) bool {
	for _, r := range s {
		if unicode.IsControl(r) {
			return true
		}
	}
	return false
}

// mustEscape reports whether b is written as %XX in a Redis key. ':' separates the key's parts, '%'
// introduces an escape, the glob characters would make an id a pattern, '{' and '}' would make part
// of an id a Redis Cluster hash tag.
func mustEscape(b byte) bool { return escapeTable[b] }

var escapeTable = func() (t [256]bool) {
	for b := range 0x20 {
		t[b] = true
	}
	for _, b := range []byte(":%*?[]\\^{} \x7f") {
		t[b] = true
	}
	return t
}()

const upperHex = "0123456789ABCDEF"

// appendEscaped appends s to b with mustEscape's bytes as %XX. Every read builds its Redis keys with
// it, so the runs between escapes, usually all of s, are copied whole.
func appendEscaped(b []byte, s string) []byte {
	for {
		i := 0
		for i < len(s) && !escapeTable[s[i]] {
			i++
		}
		b = append(b, s[:i]...)
		if i == len(s) {
			return b
		}
		c := s[i]
		b = append(b, '%', upperHex[c>>4], upperHex[c&15])
		s = s[i+1:]
	}
}

// unescape reverses appendEscaped; it reports false for input appendEscaped cannot produce.
func unescape(s string) (string, bool) {
	if strings.IndexByte(s, '%') < 0 {
		for i := 0; i < len(s); i++ {
			if mustEscape(s[i]) {
				return "", false
			}
		}
		return s, true
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%':
			if i+2 >= len(s) {
				return "", false
			}
			hi, lo := strings.IndexByte(upperHex, s[i+1]), strings.IndexByte(upperHex, s[i+2])
			if hi < 0 || lo < 0 || !mustEscape(byte(hi<<4|lo)) {
				return "", false
			}
			b = append(b, byte(hi<<4|lo))
			i += 2
		case mustEscape(c):
			return "", false
		default:
			b = append(b, c)
		}
	}
	return string(b), true
}
