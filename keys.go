package imgcache

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

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
	// s is the canonical form: entity NUL id NUL name NUL value NUL name NUL value ..., parameters
	// sorted by name. Valid parts contain no control bytes, so NUL cannot occur inside a part and the
	// form is unambiguous. An invalid key has s = NUL followed by the reason; the zero Key has s = "".
	s string
	// h is xxhash64 of s, used to pick an L1 shard without hashing the key again on every read.
	h uint64
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
	return checkedKey(e + "\x00" + id)
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
	// One pass over the sorted pairs, writing the new one in its place: one allocation in all.
	head, rest := k.split()
	var b strings.Builder
	b.Grow(len(k.s) + len(n) + len(v) + 2)
	b.WriteString(head)
	pair := func(name, value string) {
		b.WriteByte(0)
		b.WriteString(name)
		b.WriteByte(0)
		b.WriteString(value)
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
	return checkedKey(b.String())
}

// Valid reports whether the key was built from good input.
func (k Key) Valid() bool { return k.s != "" && k.s[0] != 0 }

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
	e, _, _ := strings.Cut(k.s, "\x00")
	return e
}

// ID returns the id exactly as given to [NewKey], or "" for an invalid key.
func (k Key) ID() string {
	if !k.Valid() {
		return ""
	}
	_, rest, _ := strings.Cut(k.s, "\x00")
	id, _, _ := strings.Cut(rest, "\x00")
	return id
}

// String returns the key as it appears in Redis after "<Namespace>:", as described on [Key]. An
// invalid key returns "!invalid(<reason>)", which contains characters no valid key has.
func (k Key) String() string {
	if !k.Valid() {
		if k.s == "" {
			return "!invalid(zero Key)"
		}
		return "!invalid(" + k.s[1:] + ")"
	}
	var buf [128]byte // most keys fit: the only allocation is the string itself
	return string(k.appendString(buf[:0]))
}

// appendString appends String's form of a valid key to b.
func (k Key) appendString(b []byte) []byte {
	e, id, params := k.parts()
	return appendKeyString(b, e, id, params)
}

// parts returns a valid key's entity, id and canonical parameters.
func (k Key) parts() (entity, id, params string) {
	head, params := k.split()
	entity, id, _ = strings.Cut(head, "\x00")
	return entity, id, params
}

// appendKeyString appends String's form of the key with these parts to b.
func appendKeyString(b []byte, e, id, params string) []byte {
	b = appendEscaped(b, e)
	b = append(b, ':')
	b = appendEscaped(b, id)
	b = append(b, ':')
	if params == "" { // most keys: the hash of no parameters is a constant
		return append(b, noParamsSum...)
	}
	return appendParamsSum(b, params)
}

// appendParamsSum appends the hex form of params' xxhash, big-endian.
func appendParamsSum(b []byte, params string) []byte {
	var sum [8]byte
	h := xxhash.Sum64String(params)
	for i := 7; i >= 0; i-- {
		sum[i] = byte(h)
		h >>= 8
	}
	return hex.AppendEncode(b, sum[:])
}

// noParamsSum is appendParamsSum's form of no parameters.
var noParamsSum = string(appendParamsSum(nil, ""))

// GoString makes %#v print the key readably in test failures.
func (k Key) GoString() string { return "imgcache.Key(" + k.String() + ")" }

// entityPrefix returns "<escaped entity>:<escaped id>:", the part of the Redis key (after the
// namespace) that every variant of one entity's id shares.
func entityPrefix(entity, id string) string {
	b := appendEscaped(nil, entity)
	b = append(b, ':')
	b = appendEscaped(b, id)
	return string(append(b, ':'))
}

var errZeroKey = errors.New("imgcache: invalid key: zero Key (use NewKey)")

func badKey(reason string) Key { return Key{s: "\x00" + reason} }

func checkedKey(s string) Key {
	if len(s) > MaxKeyLen {
		return badKey(fmt.Sprintf("key of %d bytes is longer than %d", len(s), MaxKeyLen))
	}
	return Key{s: s, h: xxhash.Sum64String(s)}
}

// split returns "entity NUL id" and the parameter part "name NUL value NUL ..." (without its leading
// NUL), which is what the parameter hash covers.
func (k Key) split() (head, params string) {
	i := strings.IndexByte(k.s, 0)
	j := strings.IndexByte(k.s[i+1:], 0)
	if j < 0 {
		return k.s, ""
	}
	return k.s[:i+1+j], k.s[i+2+j:]
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
