package imgcache

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
)

// --- envelope ---

const testCodec uint32 = 0x5EED1234

// envBytes builds an envelope with an empty stamp by hand, independently of appendHeader.
func envBytes(magic, version, flags byte, codec uint32, expiryMs int64, payload string) []byte {
	b := []byte{magic, version, flags}
	b = binary.BigEndian.AppendUint32(b, codec)
	b = binary.BigEndian.AppendUint64(b, uint64(expiryMs))
	b = append(b, 0, 0) // entity generation 0, no tags
	return append(b, payload...)
}

// emptyStampLen is the length of the header plus an empty stamp.
const emptyStampLen = envHeaderLen + 2

func TestEnvelopeHeaderLayout(t *testing.T) {
	got := appendHeader([]byte("prefix"), 0x01020304, true, 0x0A0B0C0D0E0F1011, stamp{})
	want := append([]byte("prefix"), 0xC1, 1, 1, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0, 0)
	if !bytes.Equal(got, want) {
		t.Errorf("got % x, want % x", got, want)
	}
	if got, want := len(appendHeader(nil, 0, false, 0, stamp{})), emptyStampLen; got != want {
		t.Errorf("header length: got %d, want %d", got, want)
	}
}

func TestEnvelopeRoundTrip(t *testing.T) {
	tests := []struct {
		name     string
		negative bool
		expiryMs int64
		payload  string
	}{
		{"value", false, 1_700_000_000_123, `{"path":"/a.webp"}`},
		{"empty payload", false, 1, ""},
		{"negative", true, 1_700_000_000_123, ""},
		{"zero expiry", false, 0, "x"},
		{"negative expiry", false, -1, "x"},
		{"max expiry", false, math.MaxInt64, "x"},
		{"min expiry", true, math.MinInt64, ""},
		{"binary payload", false, 42, "\xC1\x01\x00\xff\x00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := append(appendHeader(nil, testCodec, tt.negative, tt.expiryMs, stamp{}), tt.payload...)
			env, err := decodeEnvelope(data, testCodec, len(data))
			if err != nil {
				t.Fatalf("got error %v, want nil", err)
			}
			if env.negative != tt.negative || env.expiryMs != tt.expiryMs || string(env.payload) != tt.payload {
				t.Errorf("got {%v %d %q}, want {%v %d %q}",
					env.negative, env.expiryMs, env.payload, tt.negative, tt.expiryMs, tt.payload)
			}
			if len(env.payload) > 0 && &env.payload[0] != &data[emptyStampLen] {
				t.Errorf("got a copied payload, want a sub-slice of the input")
			}
		})
	}
}

func TestEnvelopeStampRoundTrip(t *testing.T) {
	st := stamp{entityGen: 1<<62 + 7, tags: []tagGen{{"artist:123", 1}, {"album:9", 1<<40 + 3}, {"é", 0}}}
	data := append(appendHeader(nil, testCodec, false, 99, st), "payload"...)
	env, err := decodeEnvelope(data, testCodec, len(data))
	if err != nil {
		t.Fatal(err)
	}
	if env.entityGen != st.entityGen || string(env.payload) != "payload" || env.ntags != len(st.tags) {
		t.Fatalf("got %+v", env)
	}
	var got []tagGen
	env.eachTag(func(tag []byte, gen uint64) { got = append(got, tagGen{string(tag), gen}) })
	if fmt.Sprint(got) != fmt.Sprint(st.tags) {
		t.Errorf("tags: got %v, want %v", got, st.tags)
	}
}

func TestEnvelopeRejects(t *testing.T) {
	valid := envBytes(0xC1, 1, 0, testCodec, 1000, "payload")
	tests := []struct {
		name    string
		data    []byte
		maxSize int
		want    error
	}{
		{"nil", nil, 1 << 20, errEnvShort},
		{"one byte", []byte{0xC1}, 1 << 20, errEnvShort},
		{"header minus one", valid[:envHeaderLen-1], 1 << 20, errEnvShort},
		{"no stamp", valid[:envHeaderLen], 1 << 20, errEnvStamp},
		{"stamp without tag count", valid[:envHeaderLen+1], 1 << 20, errEnvStamp},
		{"too many tags", append(bytes.Clone(valid[:envHeaderLen+1]), maxTags+1), 1 << 20, errEnvStamp},
		{"tag longer than allowed", append(bytes.Clone(valid[:envHeaderLen+1]), 1, 0x81, 0x02), 1 << 20, errEnvStamp},
		{"truncated tag", append(bytes.Clone(valid[:envHeaderLen+1]), 1, 5, 'a', 'b'), 1 << 20, errEnvStamp},
		{"tag without generation", append(bytes.Clone(valid[:envHeaderLen+1]), 1, 1, 'a'), 1 << 20, errEnvStamp},
		{"wrong magic", envBytes(0xC2, 1, 0, testCodec, 1000, "p"), 1 << 20, errEnvMagic},
		{"JSON instead of envelope", []byte(`{"path":"/srv/images/a.webp"}`), 1 << 20, errEnvMagic},
		{"version 0", envBytes(0xC1, 0, 0, testCodec, 1000, "p"), 1 << 20, errEnvVersion},
		{"version 2", envBytes(0xC1, 2, 0, testCodec, 1000, "p"), 1 << 20, errEnvVersion},
		{"unknown flag bit 1", envBytes(0xC1, 1, 2, testCodec, 1000, "p"), 1 << 20, errEnvFlags},
		{"unknown flag with negative", envBytes(0xC1, 1, 0x81, testCodec, 1000, ""), 1 << 20, errEnvFlags},
		{"other codec", envBytes(0xC1, 1, 0, testCodec+1, 1000, "p"), 1 << 20, errEnvCodec},
		{"json codec read as binary", envBytes(0xC1, 1, 0, codecID(jsonCodec{}), 1000, "{}"), 1 << 20, errEnvCodec},
		{"negative with payload", envBytes(0xC1, 1, flagNegative, testCodec, 1000, "p"), 1 << 20, errEnvNegBody},
		{"larger than maxSize", valid, len(valid) - 1, errEnvSize},
		{"size checked first", bytes.Repeat([]byte{0}, 100), 99, errEnvSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env, err := decodeEnvelope(tt.data, testCodec, tt.maxSize)
			if !errors.Is(err, tt.want) {
				t.Errorf("got error %v, want %v", err, tt.want)
			}
			if env.negative || env.expiryMs != 0 || env.payload != nil {
				t.Errorf("got envelope %+v with the error, want the zero envelope", env)
			}
		})
	}
	t.Run("exactly maxSize", func(t *testing.T) {
		if _, err := decodeEnvelope(valid, testCodec, len(valid)); err != nil {
			t.Errorf("got error %v, want nil", err)
		}
	})
}

var envSink envelope

func TestEnvelopeDecodeNoAlloc(t *testing.T) {
	inputs := map[string][]byte{
		"valid":    envBytes(0xC1, 1, 0, testCodec, 1000, strings.Repeat("p", 200)),
		"negative": envBytes(0xC1, 1, flagNegative, testCodec, 1000, ""),
		"short":    {0xC1, 1},
		"codec":    envBytes(0xC1, 1, 0, testCodec+1, 1000, "p"),
		"size":     make([]byte, 300),
	}
	for name, data := range inputs {
		t.Run(name, func(t *testing.T) {
			allocs := testing.AllocsPerRun(100, func() {
				envSink, _ = decodeEnvelope(data, testCodec, 256)
			})
			if allocs != 0 {
				t.Errorf("got %v allocs per decode, want 0", allocs)
			}
		})
	}
}

// --- ImageMeta binary form ---

func realisticMeta() ImageMeta {
	return ImageMeta{
		Path:     "/srv/images/artists/123/avatar.webp",
		Size:     48213,
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     `"5d41402abc4b2a76b9719d911017c592"`,
		ModTime:  time.Date(2024, 3, 14, 15, 9, 26, 535897932, time.UTC),
		Source:   "https://artwork.example.com/v1/artists/123/original.jpg?size=large",
	}
}

// sameImageMeta compares every field, ModTime with Equal.
func sameImageMeta(a, b ImageMeta) bool {
	return a.Path == b.Path && a.Size == b.Size && a.MIMEType == b.MIMEType && a.Width == b.Width &&
		a.Height == b.Height && a.ETag == b.ETag && a.ModTime.Equal(b.ModTime) && a.Source == b.Source
}

// metaBytes writes the binary form by hand, independently of AppendBinary.
func metaBytes(version byte, strs [4]string, ints [5]int64) []byte {
	b := []byte{version}
	for _, s := range strs {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	for _, v := range ints {
		b = binary.AppendVarint(b, v)
	}
	return b
}

func TestImageMetaBinaryLayout(t *testing.T) {
	m := realisticMeta()
	got, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	want := metaBytes(1, [4]string{m.Path, m.MIMEType, m.ETag, m.Source},
		[5]int64{m.Size, int64(m.Width), int64(m.Height), m.ModTime.Unix(), int64(m.ModTime.Nanosecond())})
	if !bytes.Equal(got, want) {
		t.Errorf("got % x, want % x", got, want)
	}
	appended, err := m.AppendBinary([]byte("hdr"))
	if err != nil || !bytes.Equal(appended, append([]byte("hdr"), want...)) {
		t.Errorf("AppendBinary: got % x, %v, want % x, nil", appended, err, append([]byte("hdr"), want...))
	}
}

func TestImageMetaRoundTrip(t *testing.T) {
	cest := time.FixedZone("CEST", 2*60*60)
	tests := []struct {
		name string
		m    ImageMeta
	}{
		{"zero value", ImageMeta{}},
		{"realistic", realisticMeta()},
		{"non-UTC time", ImageMeta{Path: "/a.png", ModTime: time.Date(2023, 7, 1, 23, 30, 0, 1, cest)}},
		{"local time with monotonic reading", ImageMeta{ModTime: time.Now()}},
		{"before 1970", ImageMeta{ModTime: time.Date(1969, 12, 31, 23, 59, 59, 999999999, time.UTC)}},
		{"year 1", ImageMeta{ModTime: time.Date(1, 1, 1, 0, 0, 0, 1, time.UTC)}},
		{"far future", ImageMeta{ModTime: time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)}},
		{"unicode strings", ImageMeta{
			Path: "/srv/images/artists/Björk/アバター.webp", MIMEType: "image/webp",
			ETag: `W/"ünïcödé-🎨"`, Source: "https://例え.jp/画像?q=日本語"}},
		{"negative ints", ImageMeta{Size: -1, Width: -512, Height: math.MinInt32}},
		{"large ints", ImageMeta{Size: math.MaxInt64, Width: math.MaxInt, Height: math.MinInt}},
		{"min int64 size", ImageMeta{Size: math.MinInt64}},
		{"longest fields", ImageMeta{
			Path: strings.Repeat("p", maxImageMetaField), MIMEType: strings.Repeat("m", maxImageMetaField),
			ETag: strings.Repeat("e", maxImageMetaField), Source: strings.Repeat("s", maxImageMetaField)}},
		{"NUL and invalid UTF-8 bytes", ImageMeta{Path: "a\x00b", ETag: "\xff\xfe"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, err := tt.m.MarshalBinary()
			if err != nil {
				t.Fatalf("MarshalBinary: got %v, want nil", err)
			}
			got := ImageMeta{Path: "stale", Size: 99} // decoding must replace every field
			if err := got.UnmarshalBinary(data); err != nil {
				t.Fatalf("UnmarshalBinary: got %v, want nil", err)
			}
			if !sameImageMeta(got, tt.m) {
				t.Errorf("got %+v, want %+v", got, tt.m)
			}
			if got, want := got.ModTime.Location(), time.UTC; got != want {
				t.Errorf("ModTime location: got %v, want %v", got, want)
			}
			if tt.m.ModTime.IsZero() && !got.ModTime.IsZero() {
				t.Errorf("zero ModTime: got %v, want the zero time", got.ModTime)
			}
		})
	}
}

func TestImageMetaMarshalTooLong(t *testing.T) {
	for i, m := range []ImageMeta{
		{Path: strings.Repeat("p", maxImageMetaField+1)},
		{MIMEType: strings.Repeat("m", maxImageMetaField+1)},
		{ETag: strings.Repeat("e", maxImageMetaField+1)},
		{Source: strings.Repeat("s", maxImageMetaField+1)},
	} {
		if _, err := m.MarshalBinary(); err == nil {
			t.Errorf("field %d over the limit: got nil error, want an error", i)
		}
	}
}

func TestImageMetaUnmarshalRejects(t *testing.T) {
	m := realisticMeta()
	good, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	strs := [4]string{"/a", "image/png", `"x"`, ""}
	ints := [5]int64{1, 2, 3, 1_700_000_000, 5}
	tests := []struct {
		name string
		data []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"version only", []byte{1}},
		{"version 0", metaBytes(0, strs, ints)},
		{"version 2", metaBytes(2, strs, ints)},
		{"JSON", []byte(`{"path":"/a"}`)},
		{"trailing byte", append(metaBytes(1, strs, ints), 0)},
		{"trailing bytes", append(bytes.Clone(good), "junk"...)},
		{"string length past the end", append([]byte{1}, binary.AppendUvarint(nil, 1000)...)},
		{"string length over the field limit", append(append([]byte{1}, binary.AppendUvarint(nil, maxImageMetaField+1)...),
			make([]byte, maxImageMetaField+1)...)},
		{"huge string length", append([]byte{1}, binary.AppendUvarint(nil, math.MaxUint64)...)},
		{"string length overflows uvarint", append([]byte{1}, bytes.Repeat([]byte{0xff}, 11)...)},
		{"int overflows varint", append(metaBytes(1, strs, [5]int64{})[:1+4+len("/a")+len("image/png")+len(`"x"`)],
			bytes.Repeat([]byte{0xff}, 11)...)},
		{"negative nanoseconds", metaBytes(1, strs, [5]int64{1, 2, 3, 4, -1})},
		{"nanoseconds of a whole second", metaBytes(1, strs, [5]int64{1, 2, 3, 4, 1e9})},
	}
	for n := range len(good) {
		tests = append(tests, struct {
			name string
			data []byte
		}{fmt.Sprintf("truncated to %d bytes", n), good[:n]})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got ImageMeta
			err := got.UnmarshalBinary(tt.data) // must not panic
			if err == nil {
				t.Errorf("got nil error and %+v, want an error", got)
			}
		})
	}
}

// --- codec choice ---

// namelessCodec has no Name method: it is named by its Go type.
type namelessCodec struct{}

func (namelessCodec) Marshal(v any) ([]byte, error)      { return jsonCodec{}.Marshal(v) }
func (namelessCodec) Unmarshal(data []byte, v any) error { return jsonCodec{}.Unmarshal(data, v) }

// onlyMarshaler can encode itself but not decode: it gets JSON.
type onlyMarshaler struct{ A int }

func (onlyMarshaler) MarshalBinary() ([]byte, error) { return nil, nil }

func TestDefaultCodecFor(t *testing.T) {
	tests := []struct {
		name string
		got  Codec
		want Codec
	}{
		{"ImageMeta", defaultCodecFor[ImageMeta](), binaryCodec{}},
		{"map[string]int", defaultCodecFor[map[string]int](), jsonCodec{}},
		{"string", defaultCodecFor[string](), jsonCodec{}},
		{"*ImageMeta", defaultCodecFor[*ImageMeta](), jsonCodec{}},
		{"marshaler only", defaultCodecFor[onlyMarshaler](), jsonCodec{}},
		{"time.Time", defaultCodecFor[time.Time](), binaryCodec{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %T, want %T", tt.got, tt.want)
			}
		})
	}
}

func TestCodecNameAndID(t *testing.T) {
	codecs := []struct {
		c    Codec
		name string
	}{
		{jsonCodec{}, "encoding/json"},
		{binaryCodec{}, "encoding.BinaryMarshaler"},
		{namelessCodec{}, "imgcache.namelessCodec"},
	}
	seen := map[uint32]string{}
	for _, tt := range codecs {
		if got := codecName(tt.c); got != tt.name {
			t.Errorf("codecName(%T): got %q, want %q", tt.c, got, tt.name)
		}
		id := codecID(tt.c)
		if want := uint32(xxhash.Sum64String(tt.name)); id != want {
			t.Errorf("codecID(%T): got %#x, want %#x", tt.c, id, want)
		}
		if other, ok := seen[id]; ok {
			t.Errorf("codecID(%T) = %#x, the same as %s's; want different", tt.c, id, other)
		}
		seen[id] = tt.name
	}
}

func TestCodecsRoundTripImageMeta(t *testing.T) {
	for _, c := range []Codec{jsonCodec{}, binaryCodec{}} {
		t.Run(codecName(c), func(t *testing.T) {
			want := realisticMeta()
			want.ModTime = want.ModTime.In(time.FixedZone("X", -5*3600))
			data, err := c.Marshal(want)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			var got ImageMeta
			if err := c.Unmarshal(data, &got); err != nil {
				t.Fatalf("Unmarshal: %v", err)
			}
			if !sameImageMeta(got, want) {
				t.Errorf("got %+v, want %+v", got, want)
			}
		})
	}
}

func TestBinaryCodecRejectsOtherTypes(t *testing.T) {
	if _, err := (binaryCodec{}).Marshal(map[string]int{"a": 1}); err == nil {
		t.Errorf("Marshal(map): got nil error, want an error")
	}
	var n int
	if err := (binaryCodec{}).Unmarshal([]byte{1}, &n); err == nil {
		t.Errorf("Unmarshal(*int): got nil error, want an error")
	}
	var m ImageMeta
	if err := (binaryCodec{}).Unmarshal([]byte{0xff}, &m); err == nil {
		t.Errorf("Unmarshal(foreign version): got nil error, want an error")
	}
}

// --- benchmarks ---

// BenchmarkCodec compares the codecs a Cache[ImageMeta] could use: JSON (the fallback), the binary
// form (the default for ImageMeta) and gob with a new encoder/decoder per value, as a naive user
// would write it. JSON and binary go through the Codec interface, as the cache does.
func BenchmarkCodec(b *testing.B) {
	m := realisticMeta()
	if c := defaultCodecFor[ImageMeta](); c != (binaryCodec{}) {
		b.Fatalf("default codec for ImageMeta: got %T, want binaryCodec", c)
	}
	gobCodec := gobPerValueCodec{}
	for _, c := range []struct {
		name  string
		codec Codec
	}{
		{"json", jsonCodec{}},
		{"binary", defaultCodecFor[ImageMeta]()},
		{"gob", gobCodec},
	} {
		data, err := c.codec.Marshal(m)
		if err != nil {
			b.Fatal(err)
		}
		var check ImageMeta
		if err := c.codec.Unmarshal(data, &check); err != nil || !sameImageMeta(check, m) {
			b.Fatalf("%s: round trip: got %+v, %v, want %+v", c.name, check, err, m)
		}
		size := float64(len(data))
		b.Run(c.name+"/marshal", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.codec.Marshal(m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(size, "B/value")
		})
		b.Run(c.name+"/unmarshal", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var got ImageMeta
				if err := c.codec.Unmarshal(data, &got); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(size, "B/value")
		})
		b.Run(c.name+"/roundtrip", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p, err := c.codec.Marshal(m)
				if err != nil {
					b.Fatal(err)
				}
				var got ImageMeta
				if err := c.codec.Unmarshal(p, &got); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(size, "B/value")
		})
	}
}

// gobPerValueCodec is encoding/gob with a new Encoder (and Decoder) for every value, so every value
// carries its type description.
type gobPerValueCodec struct{}

func (gobPerValueCodec) Marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (gobPerValueCodec) Unmarshal(data []byte, v any) error {
	return gob.NewDecoder(bytes.NewReader(data)).Decode(v)
}
