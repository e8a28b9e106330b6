package imgcache

import (
	"encoding"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"

	"github.com/cespare/xxhash/v2"
)

// Codec turns values into the bytes stored in Redis and back. Unmarshal is given a pointer to a V,
// and bytes that it must not modify: they alias the reply that go-redis read, not a copy of it.
// Keeping them after Unmarshal returns is safe, as nothing else writes to them.
//
// The default codec (Options.Codec nil) uses a type's own compact binary encoding when the value type
// V implements encoding.BinaryMarshaler and *V implements encoding.BinaryUnmarshaler, as [ImageMeta]
// does, and encoding/json otherwise.
//
// Every value is stored inside a small envelope that names the codec, so that a value written by
// another codec is recognised as such instead of being misread: a custom Codec is named by its Name()
// method if it has one (func() string), and by its Go type otherwise. Change the name whenever the
// encoding changes incompatibly; values written under the old name then read as misses and are
// replaced.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// jsonCodec is encoding/json: slower and larger than a binary encoding, but works for any V.
type jsonCodec struct{}

func (jsonCodec) Name() string                       { return "encoding/json" }
func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// binaryCodec uses the value's own MarshalBinary/UnmarshalBinary (or AppendBinary, which saves a copy).
type binaryCodec struct{}

func (binaryCodec) Name() string { return "encoding.BinaryMarshaler" }

func (binaryCodec) Marshal(v any) ([]byte, error) {
	m, ok := v.(encoding.BinaryMarshaler)
	if !ok {
		return nil, fmt.Errorf("%T does not implement encoding.BinaryMarshaler", v)
	}
	return m.MarshalBinary()
}

func (binaryCodec) Unmarshal(data []byte, v any) error {
	u, ok := v.(encoding.BinaryUnmarshaler)
	if !ok {
		return fmt.Errorf("%T does not implement encoding.BinaryUnmarshaler", v)
	}
	return u.UnmarshalBinary(data)
}

// defaultCodecFor picks the default codec for V: binary when V can do both directions, JSON otherwise.
func defaultCodecFor[V any]() Codec {
	var v V
	_, m := any(v).(encoding.BinaryMarshaler)
	_, u := any(&v).(encoding.BinaryUnmarshaler)
	if m && u {
		return binaryCodec{}
	}
	return jsonCodec{}
}

func codecName(c Codec) string {
	if n, ok := c.(interface{ Name() string }); ok {
		return n.Name()
	}
	return reflect.TypeOf(c).String()
}

// The envelope wraps every value stored in Redis:
//
//	offset size field
//	0      1    magic, 0xC1
//	1      1    format version, 1
//	2      1    flags: bit 0 = negative (a remembered "not found", no payload)
//	3      4    codec id: the low 32 bits of xxhash64 of the codec's name, big-endian
//	7      8    expiry in Unix milliseconds by the writer's clock, big-endian; it lets an L2 hit bound
//	            its L1 lifetime without a PTTL round trip (hosts' clocks may differ: L1TTL bounds that)
//	15     -    stamp: uvarint generation of the key's entity, uvarint number of tags (at most
//	            maxTags), then per tag a uvarint length (at most maxTagLen), its bytes and a uvarint
//	            generation. A reader compares them with the generations in Redis; see invalidate.go.
//	-      -    payload
//
// A reader that finds another magic, version, codec id, an unknown flag or a malformed stamp treats
// the value as unreadable: a miss, deleted from Redis, counted as an L2 error.
const (
	envMagic     = 0xC1
	envVersion   = 1
	envHeaderLen = 15

	flagNegative = 1 << 0
	knownFlags   = flagNegative

	maxTags   = 32  // tags on one value
	maxTagLen = 256 // bytes in one tag
)

var (
	errEnvShort   = errors.New("value shorter than the envelope header")
	errEnvMagic   = errors.New("value is not an imgcache envelope")
	errEnvVersion = errors.New("envelope format version is not supported")
	errEnvFlags   = errors.New("envelope has unknown flags")
	errEnvCodec   = errors.New("value was written by another codec")
	errEnvSize    = errors.New("value is larger than MaxValueSize")
	errEnvNegBody = errors.New("negative envelope has a payload")
	errEnvStamp   = errors.New("envelope stamp is malformed")
)

// stamp is what a value was written under: the generations of its entity and of each of its tags.
type stamp struct {
	entityGen uint64
	tags      []tagGen
}

type tagGen struct {
	tag string
	gen uint64
}

type envelope struct {
	negative  bool
	expiryMs  int64
	entityGen uint64
	ntags     int
	tagsRaw   []byte // the tag section of the stamp; read it with eachTag
	payload   []byte // aliases the input
}

func codecID(c Codec) uint32 { return uint32(xxhash.Sum64String(codecName(c))) }

// appendHeader appends an envelope header and stamp; the payload follows them.
func appendHeader(b []byte, codec uint32, negative bool, expiryMs int64, st stamp) []byte {
	var flags byte
	if negative {
		flags |= flagNegative
	}
	b = append(b, envMagic, envVersion, flags)
	b = binary.BigEndian.AppendUint32(b, codec)
	b = binary.BigEndian.AppendUint64(b, uint64(expiryMs))
	b = binary.AppendUvarint(b, st.entityGen)
	b = binary.AppendUvarint(b, uint64(len(st.tags)))
	for _, t := range st.tags {
		b = binary.AppendUvarint(b, uint64(len(t.tag)))
		b = append(b, t.tag...)
		b = binary.AppendUvarint(b, t.gen)
	}
	return b
}

// decodeEnvelope checks the header and stamp and returns the payload as a sub-slice of data: it
// never allocates, and it refuses anything longer than maxSize before looking further.
func decodeEnvelope(data []byte, codec uint32, maxSize int) (envelope, error) {
	switch {
	case len(data) > maxSize:
		return envelope{}, errEnvSize
	case len(data) < envHeaderLen:
		return envelope{}, errEnvShort
	case data[0] != envMagic:
		return envelope{}, errEnvMagic
	case data[1] != envVersion:
		return envelope{}, errEnvVersion
	case data[2]&^knownFlags != 0:
		return envelope{}, errEnvFlags
	case binary.BigEndian.Uint32(data[3:7]) != codec:
		return envelope{}, errEnvCodec
	}
	e := envelope{
		negative: data[2]&flagNegative != 0,
		expiryMs: int64(binary.BigEndian.Uint64(data[7:15])),
	}
	rest := data[envHeaderLen:]
	var w int
	if e.entityGen, w = binary.Uvarint(rest); w <= 0 {
		return envelope{}, errEnvStamp
	}
	rest = rest[w:]
	n, w := binary.Uvarint(rest)
	if w <= 0 || n > maxTags {
		return envelope{}, errEnvStamp
	}
	rest = rest[w:]
	tags := rest
	for range n {
		l, w := binary.Uvarint(rest)
		if w <= 0 || l > maxTagLen || l > uint64(len(rest)-w) {
			return envelope{}, errEnvStamp
		}
		rest = rest[w+int(l):]
		if _, w = binary.Uvarint(rest); w <= 0 {
			return envelope{}, errEnvStamp
		}
		rest = rest[w:]
	}
	e.ntags, e.tagsRaw, e.payload = int(n), tags[:len(tags)-len(rest)], rest
	if e.negative && len(e.payload) != 0 {
		return envelope{}, errEnvNegBody
	}
	return e, nil
}

// eachTag calls f for each tag of a decoded envelope's stamp, in order; tag aliases the value.
func (e envelope) eachTag(f func(tag []byte, gen uint64)) {
	rest := e.tagsRaw
	for range e.ntags {
		l, w := binary.Uvarint(rest)
		tag := rest[w : w+int(l)]
		rest = rest[w+int(l):]
		gen, w := binary.Uvarint(rest)
		rest = rest[w:]
		f(tag, gen)
	}
}
