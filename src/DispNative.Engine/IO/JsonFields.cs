using System.Diagnostics.CodeAnalysis;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DispNative.Engine.IO;

/// <summary>Typed reads of the fields of model files (config.json, tokenizer.json). An optional field that is absent
/// or null reads as null; a field of another type is an error naming it, never its default or a crash.</summary>
internal static class JsonFields
{
    /// <summary>Parsing options for model files: a key given twice is an error (System.Text.Json's nodes otherwise fail
    /// with an exception of their own when such an object is first read).</summary>
    public static readonly JsonDocumentOptions Strict = new() { AllowDuplicateProperties = false };

    public static T? Optional<T>(JsonObject o, string key, string source) where T : struct => o[key] switch
    {
        null => null,
        JsonValue v when TryRead(v, out T x) => x,
        var other => throw WrongType(key, Kind<T>(), other, source),
    };

    public static string? OptionalString(JsonObject o, string key, string source) => o[key] switch
    {
        null => null,
        JsonValue v when v.TryGetValue(out string? x) => x,
        var other => throw WrongType(key, "a string", other, source),
    };

    public static JsonObject? OptionalObject(JsonObject o, string key, string source) => o[key] switch
    {
        null => null,
        JsonObject x => x,
        var other => throw WrongType(key, "an object", other, source),
    };

    public static JsonArray? OptionalArray(JsonObject o, string key, string source) => o[key] switch
    {
        null => null,
        JsonArray x => x,
        var other => throw WrongType(key, "an array", other, source),
    };

    /// <summary>An element of a list that must be an object; <paramref name="what"/> names the list.</summary>
    public static JsonObject ObjectElement(JsonNode? n, string what, string source) =>
        n as JsonObject ?? throw WrongType(what, "a list of objects", n, source);

    public static T Required<T>(JsonObject o, string key, string source) where T : struct =>
        Optional<T>(o, key, source) ?? throw Missing(key, source);

    public static string RequiredString(JsonObject o, string key, string source) => OptionalString(o, key, source) ?? throw Missing(key, source);

    /// <summary>An element of a list that must be <typeparamref name="T"/>; <paramref name="what"/> names the list.</summary>
    public static T Element<T>(JsonNode? n, string what, string source) =>
        n is JsonValue v && TryRead(v, out T? x) && x is not null ? x : throw WrongType(what, Kind<T>(), n, source);

    /// <summary>A value built in memory keeps its CLR type (a float does not read as a double); its JSON text does.</summary>
    private static bool TryRead<T>(JsonValue v, [MaybeNullWhen(false)] out T x) =>
        v.TryGetValue(out x) || (JsonNode.Parse(v.ToJsonString()) is JsonValue parsed && parsed.TryGetValue(out x));

    private static ModelFormatException Missing(string key, string source) => new($"{source}: missing field '{key}'");

    private static ModelFormatException WrongType(string key, string kind, JsonNode? got, string source) =>
        new($"{source}: field '{key}' must be {kind} (got {got?.ToJsonString() ?? "null"})");

    private static string Kind<T>() =>
        typeof(T) == typeof(int) ? "an integer" : typeof(T) == typeof(bool) ? "true or false" : typeof(T) == typeof(string) ? "a string" : "a number";
}
