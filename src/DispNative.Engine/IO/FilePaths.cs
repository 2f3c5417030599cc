namespace DispNative.Engine.IO;

/// <summary>The one wording for paths a user names that cannot serve: a missing input, a directory where a file
/// belongs, an output file whose folder does not exist.</summary>
public static class FilePaths
{
    /// <summary>Null when <paramref name="path"/> is a readable file; else why not, as "<paramref name="what"/> not
    /// found: path" or "<paramref name="what"/> path is a directory, not a file".</summary>
    public static string? InputProblem(string path, string what) =>
        File.Exists(path) ? null
        : Directory.Exists(path) ? $"{what} {path} is a directory, not a file"
        : $"{what} not found: {path}";

    /// <summary>Null when a file can be written at <paramref name="path"/> (a path, not a directory, in a folder that
    /// exists); else why not, prefixed with <paramref name="what"/>.</summary>
    public static string? OutputProblem(string path, string what)
    {
        if (string.IsNullOrWhiteSpace(path)) return $"{what}: the path is empty";
        if (Directory.Exists(path)) return $"{what}: {path} is a directory; give a file name";
        string? folder = Path.GetDirectoryName(Path.GetFullPath(path));
        return folder == null || Directory.Exists(folder) ? null : $"{what}: the folder {folder} does not exist";
    }

    /// <summary>Throws <see cref="InvalidSettingException"/> for an empty or blank output directory (.NET's file APIs
    /// would throw an <see cref="ArgumentException"/> on it).</summary>
    public static void RequireOutputDirectory(string directory, string what)
    {
        if (string.IsNullOrWhiteSpace(directory)) throw new InvalidSettingException($"{what}: the path is empty");
    }

    /// <summary>Throws <see cref="InvalidSettingException"/> with <see cref="InputProblem"/>'s message.</summary>
    public static void RequireInput(string path, string what)
    {
        if (InputProblem(path, what) is { } why) throw new InvalidSettingException(why);
    }
}
